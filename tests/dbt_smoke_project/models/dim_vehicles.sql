{{ config(materialized='table', engine='MergeTree()', order_by='vehicle_id') }}

select
    vehicle_id,
    name,
    fleet
from {{ ref('vehicles') }}
{% if var('inject_bad_row') %}
union all
select toUInt32(1) as vehicle_id, 'truck-01-duplicate' as name, 'north' as fleet
{% endif %}
