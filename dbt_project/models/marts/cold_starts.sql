-- Every replica launch: how long loading took and what it cost (GPU price × GPUs × load time, at
-- the catalog price of the launch day). Loading is part of a replica-hour's idle cost; this model
-- names it per launch so slow or frequent cold starts stand out.
with launches as (

    select
        l.*,
        toDate(l.launched_at, 'UTC') as day,
        coalesce(nullIf(l.gpu_type, ''), nullIf(g.gpu_type, ''), '') as gpu_type_name,
        coalesce(l.gpu_count, nullIf(g.gpu_count, 0), 1) as gpus
    from {{ ref('int_replica_launches') }} as l
    left join {{ ref('replica_gpus') }} as g on g.model = l.model

),

priced as (

    select launches.*, p.usd_per_gpu_hour as catalog_usd_per_gpu_hour
    from launches
    asof left join {{ gpu_price_catalog() }} as p
        on launches.gpu_type_name = p.gpu_type and launches.day >= p.effective_from

)

select
    launch_id,
    day,
    replica,
    model,
    model_variant,
    gpu_type_name as gpu_type,
    toUInt16(gpus) as gpu_count,
    launched_at,
    ready_at,
    load_seconds,
    succeeded,
    error_type,
    coalesce(catalog_usd_per_gpu_hour, gpu_hourly_usd, 0) as usd_per_gpu_hour,
    usd_per_gpu_hour * gpu_count * load_seconds / 3600 as loading_usd

from priced
