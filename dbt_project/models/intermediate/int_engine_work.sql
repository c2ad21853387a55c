{{
  config(
    materialized='incremental',
    partition_by="toDate(hour, 'UTC')",
    order_by='(replica, hour, trace_id)',
  )
}}
-- The GPU work of every request a replica ran, cut at clock hours: one row per (llm_request span,
-- hour it overlaps). Work is the time the request was scheduled in the engine — from the end of
-- its queue wait to its end, so prefill and decode, not queueing. These slices are both what makes
-- a replica-hour busy (their union) and the weights its busy cost is split by (their lengths).
with engine_requests as (

    select
        trace_id,
        span_id,
        coalesce(replica, if(startsWith(service_name, 'vllm-'), substring(service_name, 6), service_name)) as replica,
        {{ fleetlens_seconds('started_at') }} + coalesce(engine_queue_s, 0) as work_start_s,
        {{ fleetlens_seconds('started_at') }} + duration_ns / 1e9 as work_end_s

    from {{ ref('stg_otel__spans') }}
    where span_name = 'llm_request'
      and started_at >= {{ recompute_from('hour') }} - toIntervalHour({{ var('max_request_hours') | int }})
      and started_at < {{ recompute_until() }}

),

slices as (

    select trace_id, span_id, replica, {{ hour_slices('work_start_s', 'work_end_s') }} as slice
    from engine_requests
    where work_end_s > work_start_s

)

select
    slice.1 as hour,
    replica,
    trace_id,
    span_id,
    slice.2 as work_start_s,
    slice.3 as work_end_s,
    slice.3 - slice.2 as work_s

from slices
where slice.1 >= {{ recompute_from('hour') }}
  and slice.1 < {{ recompute_until() }}
  and slice.3 > slice.2
