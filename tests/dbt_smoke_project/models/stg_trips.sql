{{ config(materialized='view') }}

select
    trip_id,
    vehicle_id,
    lower(status) as status,
    distance_km,
    updated_at
from {{ source('raw', 'trips') }}
