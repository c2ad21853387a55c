-- The money adds up, to the cent, over everything built: what requests were allocated is the
-- fleet's busy cost, and fully loaded costs plus the idle nobody could absorb (model-hours
-- without a request) is the whole GPU bill.
with bill as (

    select sum(bill_usd) as bill_usd, sum(busy_usd) as busy_usd from {{ ref('int_replica_hours') }}

),

stranded as (

    select sum(idle_usd) as stranded_idle_usd
    from (
        select model, hour, sum(busy_usd) as busy, sum(idle_usd) as idle_usd
        from {{ ref('int_replica_hours') }}
        group by model, hour
    )
    where busy = 0

),

requests as (

    select sum(allocated_usd) as allocated_usd, sum(fully_loaded_usd) as fully_loaded_usd
    from {{ ref('fct_requests') }}

)

select *
from bill, stranded, requests
where abs(allocated_usd - busy_usd) >= 0.005
   or abs(fully_loaded_usd + stranded_idle_usd - bill_usd) >= 0.005
