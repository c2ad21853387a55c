-- One row per replica launch (`replica.cold_start` span): from process start to the first good
-- health check. Its GPU type and count say what the replica occupies from then on; the load time
-- is paid for (GPUs are held) but serves nobody.
select
    span_id as launch_id,
    assumeNotNull(replica) as replica,
    request_model as model,
    model_variant,
    gpu_type,
    gpu_count,
    gpu_hourly_usd,
    started_at as launched_at,
    addNanoseconds(started_at, duration_ns) as ready_at,
    coalesce(load_seconds, duration_ns / 1e9) as load_seconds,
    CAST(status_code, 'String') != 'error' as succeeded,
    error_type

from {{ ref('stg_otel__spans') }}
where span_name = 'replica.cold_start' and replica is not null
