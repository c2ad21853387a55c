-- vLLM /metrics samples, renamed; histogram buckets keep their `le` label as a number.
with source as (

    select * from {{ source('otel', 'fleet_metrics') }}

),

renamed as (

    select
        ts as sampled_at,
        replica,
        model,
        metric,
        metric_type,
        labels,
        if(mapContains(labels, 'le'), toFloat64OrNull(labels['le']), null) as bucket_le,
        value

    from source

)

select * from renamed
