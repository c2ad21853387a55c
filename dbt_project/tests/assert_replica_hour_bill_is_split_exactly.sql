-- Every replica-hour's bill is split exactly into busy (allocated) and idle cost, and the time
-- parts fit in the hour: busy ≤ up ≤ 3600 s, loading ≤ idle.
select *
from {{ ref('int_replica_hours') }}
where abs(busy_usd + idle_usd - bill_usd) > 1e-9
   or busy_s > up_s + 1e-6
   or up_s > 3600 + 1e-6
   or loading_s > up_s - busy_s + 1e-6
   or idle_usd < -1e-9
