{{
    config(
        materialized='incremental',
        unique_key='trip_id',
        engine='MergeTree()',
        order_by='trip_id'
    )
}}

-- Latest version of each trip. Only raw rows newer than what is already loaded are processed
-- on incremental runs; a trip_id seen again replaces its previous row (unique_key), and rows not
-- seen again keep the `loaded_by` of the run that wrote them.
select
    trip_id,
    argMax(vehicle_id, event_ts) as vehicle_id,
    argMax(status, event_ts) as status,
    argMax(distance_km, event_ts) as distance_km,
    max(event_ts) as updated_at,
    '{{ invocation_id }}' as loaded_by  -- which dbt run (re)wrote the row
from (
    select trip_id, vehicle_id, status, distance_km, updated_at as event_ts
    from {{ ref('stg_trips') }}
    {% if is_incremental() %}
    where updated_at > (select max(updated_at) from {{ this }})
    {% endif %}
)
group by trip_id
