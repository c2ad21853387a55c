{#-
  `unique`, over the newest `test_window_hours` of a big incremental table (all of it when the var
  is 0). An incremental run only writes rows newer than (newest − lookback_hours), so the window
  covers everything a run can have broken, at a fraction of the cost of a whole-table check on
  80M+ rows. Run `dbt test --vars '{test_window_hours: 0}'` for the whole table.
-#}
{% test unique_in_recent_hours(model, column_name, time_column) %}
{% set hours = var('test_window_hours') | int %}
select {{ column_name }} as unique_field, count() as n_records
from {{ model }}
{% if hours > 0 %}
where {{ time_column }} >= (select max({{ time_column }}) from {{ model }}) - toIntervalHour({{ hours }})
{% endif %}
group by {{ column_name }}
having count() > 1
{% endtest %}
