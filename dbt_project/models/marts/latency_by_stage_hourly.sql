{{
  config(
    materialized='incremental',
    partition_by="toDate(hour, 'UTC')",
    order_by='(hour, stage, model, route, feature)',
  )
}}
-- Where a request's time goes, per hour × stage × model × route × feature: p50 / p95 / p99 and
-- the mean, exact. Stages: the gateway's own (auth … postprocess), `upstream` (the gateway's calls
-- to the model, retries included), the engine's (`engine_queue`, `engine_prefill`, `engine_decode`,
-- `engine_ttft`), and end to end (`ttft` as the client saw it, `e2e`). Successful requests only:
-- a 429 answered in a millisecond would flatter every percentile.
{% set stages = ['auth', 'rate_limit', 'route', 'retrieval', 'prompt_assembly', 'upstream', 'postprocess',
                 'engine_queue', 'engine_prefill', 'engine_decode', 'engine_ttft', 'ttft', 'e2e'] %}
with stage_times as (

    select
        toStartOfHour(requested_at, 'UTC') as hour,
        coalesce(model, '') as model,
        coalesce(route, '') as route,
        coalesce(feature, '(direct)') as feature,
        arrayJoin(arrayFilter(x -> x.2 is not null, [
            {% for stage in stages %}
            ('{{ stage }}', {{ stage }}_ms){{ ',' if not loop.last }}
            {% endfor %}
        ])) as stage_ms
    from {{ ref('fct_requests') }}
    where requested_at >= {{ recompute_from('hour') }} and requested_at < {{ recompute_until() }}
      and status = 'ok'

)

select
    hour,
    stage_ms.1 as stage,
    model,
    route,
    feature,
    count() as requests,
    avg(assumeNotNull(stage_ms.2)) as mean_ms,
    quantilesExact(0.5, 0.95, 0.99)(assumeNotNull(stage_ms.2)) as q,
    q[1] as p50_ms,
    q[2] as p95_ms,
    q[3] as p99_ms

from stage_times
group by hour, stage, model, route, feature
