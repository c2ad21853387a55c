-- Self-hosting each model against buying the same tokens from a managed API, over the last
-- build_vs_buy_days days of data. Self-hosted cost is the whole bill of the model's replicas (busy,
-- idle and loading: the fleet must be paid for whether or not it is used), per 1M tokens served.
-- Managed cost is the same input/output token mix at the provider's price in force on the newest
-- day. break_even_tokens_per_day: the daily volume (same mix) at which the API would cost what
-- the fleet costs per day — above it self-hosting is cheaper, below it buying is.
with newest as (

    select max(day) as last_day from {{ ref('int_replica_hours') }}

),

fleet as (

    -- days the model's replicas were up: clock hours with a bill / 24
    select model, sum(bill_usd) as bill_usd, uniqExact(hour) / 24 as days
    from {{ ref('int_replica_hours') }}
    where day > (select last_day from newest) - {{ var('build_vs_buy_days') | int }} and model != ''
    group by model

),

served as (

    select model, sum(input_tokens) as input_tokens, sum(output_tokens) as output_tokens, count() as requests
    from {{ ref('fct_requests') }}
    where day > (select last_day from newest) - {{ var('build_vs_buy_days') | int }} and model is not null
    group by model

),

prices as (

    select provider, api_model, comparable_model,
           toFloat64(argMax(usd_per_1m_input_tokens, effective_from)) as usd_per_1m_input_tokens,
           toFloat64(argMax(usd_per_1m_output_tokens, effective_from)) as usd_per_1m_output_tokens
    from {{ ref('managed_api_prices') }}
    where effective_from <= (select last_day from newest)
    group by provider, api_model, comparable_model

)

select
    f.model as model,
    f.days as days,
    s.requests as requests,
    s.input_tokens as input_tokens,
    s.output_tokens as output_tokens,
    (s.input_tokens + s.output_tokens) / f.days as tokens_per_day,
    f.bill_usd as self_hosted_usd,
    f.bill_usd / f.days as self_hosted_usd_per_day,
    if(s.input_tokens + s.output_tokens > 0, f.bill_usd / (s.input_tokens + s.output_tokens) * 1e6, null)
        as self_hosted_usd_per_1m_tokens,
    p.provider as provider,
    p.api_model as api_model,
    (s.input_tokens * p.usd_per_1m_input_tokens + s.output_tokens * p.usd_per_1m_output_tokens) / 1e6 as managed_usd,
    if(s.input_tokens + s.output_tokens > 0, managed_usd / (s.input_tokens + s.output_tokens) * 1e6, null)
        as managed_usd_per_1m_tokens,
    managed_usd - f.bill_usd as savings_usd,
    if(managed_usd_per_1m_tokens > 0, self_hosted_usd_per_day / managed_usd_per_1m_tokens * 1e6, null)
        as break_even_tokens_per_day,
    tokens_per_day >= break_even_tokens_per_day as self_hosting_cheaper

from fleet as f
inner join served as s on s.model = f.model
inner join prices as p on p.comparable_model = f.model
