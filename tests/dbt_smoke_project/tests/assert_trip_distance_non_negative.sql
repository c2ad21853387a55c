-- Singular test: returns the offending rows; passes when there are none.
select trip_id, distance_km
from {{ ref('trips_latest') }}
where distance_km < 0
