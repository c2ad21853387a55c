{{
  config(
    materialized='incremental',
    partition_by="toDate(hour, 'UTC')",
    order_by='(replica, hour)',
  )
}}
-- The GPU bill, one row per replica and clock hour, split into what served requests and what idled.
--
-- A replica costs money while it holds its GPUs, whether or not it answers: it is "up" during
--   * its launches (replica.cold_start: process start → ready),
--   * every scrape sample (fleet_metrics `up`, 0 or 1), which stands for the time until the
--     replica's next sample, at most max_scrape_gap_s,
--   * the engine work of its requests (so a replica nobody scrapes is still billed while it serves).
-- up_s is the union of those intervals inside the hour, busy_s the union of the work intervals,
-- loading_s the launches'. bill = GPU price × GPUs × up_s; busy_usd = price × GPUs × busy_s is
-- what requests pay (allocated cost); idle_usd = bill − busy_usd (loading included), exactly.
{% set gap = var('max_scrape_gap_s') | int %}
with samples as (

    select distinct replica, {{ fleetlens_seconds('sampled_at') }} as sampled_s
    from {{ ref('stg_otel__fleet_metrics') }}
    where metric = 'up'
      and sampled_at >= {{ recompute_from('hour') }} - toIntervalSecond({{ gap }})
      and sampled_at < {{ recompute_until() }} + toIntervalSecond({{ gap }})

),

intervals as (

    select replica, 'up' as kind, sampled_s as start_s,
           least(leadInFrame(sampled_s, 1, sampled_s) over (
               partition by replica order by sampled_s rows between current row and 1 following),
                 sampled_s + {{ gap }}) as end_s
    from samples

    union all

    select replica, 'load' as kind, {{ fleetlens_seconds('launched_at') }}, {{ fleetlens_seconds('ready_at') }}
    from {{ ref('int_replica_launches') }}
    where ready_at >= {{ recompute_from('hour') }} and launched_at < {{ recompute_until() }}

    union all

    select replica, 'work' as kind, work_start_s, work_end_s
    from {{ ref('int_engine_work') }}
    where hour >= {{ recompute_from('hour') }} and hour < {{ recompute_until() }}

),

slices as (

    select replica, kind, slice.1 as hour, slice.2 as start_s, slice.3 as end_s
    from (select replica, kind, {{ hour_slices('start_s', 'end_s') }} as slice from intervals where end_s > start_s)
    where slice.1 >= {{ recompute_from('hour') }} and slice.1 < {{ recompute_until() }} and slice.3 > slice.2

),

-- Union lengths: sorted by start, each interval adds what reaches past every earlier one's end.
covered as (

    select
        replica, hour, kind, start_s, end_s,
        greatest(0, end_s - greatest(start_s, max(end_s) over (
            partition by replica, hour order by start_s, end_s
            rows between unbounded preceding and 1 preceding))) as adds_to_up,
        greatest(0, end_s - greatest(start_s, max(end_s) over (
            partition by replica, hour, kind order by start_s, end_s
            rows between unbounded preceding and 1 preceding))) as adds_to_kind
    from slices

),

hours as (

    select
        replica,
        hour,
        sum(adds_to_up) as up_s,
        sumIf(adds_to_kind, kind = 'work') as busy_s,
        sumIf(adds_to_kind, kind = 'load') as loading_s,
        sumIf(end_s - start_s, kind = 'work') as work_s,
        countIf(kind = 'work') as work_slices
    from covered
    group by replica, hour

),

-- What the replica is: its latest launch before the hour ends, else the model it reports to the
-- scraper and the replica_gpus seed.
reported_models as (

    select replica, toStartOfHour(sampled_at, 'UTC') as hour, any(model) as reported_model
    from {{ ref('stg_otel__fleet_metrics') }}
    where model != ''
      and sampled_at >= {{ recompute_from('hour') }} and sampled_at < {{ recompute_until() }}
    group by replica, hour

),

described as (

    select
        h.replica as replica, h.hour as hour, h.up_s as up_s, h.busy_s as busy_s, h.loading_s as loading_s,
        h.work_s as work_s, h.work_slices as work_slices,
        toDate(h.hour, 'UTC') as day,
        coalesce(nullIf(l.model, ''), nullIf(r.reported_model, ''), '') as model_name,
        l.model_variant as model_variant,
        coalesce(l.gpu_type, nullIf(g.gpu_type, ''), '') as gpu_type_name,
        coalesce(l.gpu_count, nullIf(g.gpu_count, 0), 1) as gpus,
        l.gpu_hourly_usd as announced_usd_per_gpu_hour
    from hours as h
    asof left join (
        -- unmatched columns of a join are NULL only for Nullable types, hence toNullable
        select replica, toDateTime64(launched_at, 9, 'UTC') as launched_at, toNullable(model) as model,
               toNullable(model_variant) as model_variant, toNullable(gpu_type) as gpu_type,
               toNullable(gpu_count) as gpu_count, toNullable(gpu_hourly_usd) as gpu_hourly_usd
        from {{ ref('int_replica_launches') }}
    ) as l
        on h.replica = l.replica and toDateTime64(h.hour + 3600, 9, 'UTC') >= l.launched_at
    left join reported_models as r on h.replica = r.replica and h.hour = r.hour
    left join {{ ref('replica_gpus') }} as g on g.model = coalesce(nullIf(l.model, ''), nullIf(r.reported_model, ''), '')

),

-- The GPU price in force on the hour's day: the latest catalog row on or before it.
priced as (

    select
        d.replica as replica, d.hour as hour, d.day as day, d.up_s as up_s, d.busy_s as busy_s,
        d.loading_s as loading_s, d.work_s as work_s, d.work_slices as work_slices,
        d.model_name as model_name, d.model_variant as model_variant, d.gpu_type_name as gpu_type_name,
        d.gpus as gpus, d.announced_usd_per_gpu_hour as announced_usd_per_gpu_hour,
        p.usd_per_gpu_hour as catalog_usd_per_gpu_hour
    from described as d
    asof left join {{ gpu_price_catalog() }} as p
        on d.gpu_type_name = p.gpu_type and d.day >= p.effective_from

)

select
    hour,
    day,
    replica,
    model_name as model,
    model_variant,
    gpu_type_name as gpu_type,
    toUInt16(gpus) as gpu_count,
    '{{ var("pricing_mode") }}' as pricing_mode,
    coalesce(catalog_usd_per_gpu_hour, announced_usd_per_gpu_hour, 0) as usd_per_gpu_hour,
    multiIf(catalog_usd_per_gpu_hour is not null, 'catalog',
            announced_usd_per_gpu_hour is not null, 'replica', 'unpriced') as price_source,
    up_s,
    busy_s,
    up_s - busy_s as idle_s,
    loading_s,
    work_s,
    work_slices,
    usd_per_gpu_hour * gpu_count * up_s / 3600 as bill_usd,
    usd_per_gpu_hour * gpu_count * busy_s / 3600 as busy_usd,
    bill_usd - busy_usd as idle_usd,
    usd_per_gpu_hour * gpu_count * loading_s / 3600 as loading_usd

from priced
