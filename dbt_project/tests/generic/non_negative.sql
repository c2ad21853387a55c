{% test non_negative(model, column_name) %}
-- Rows where a duration, a count or a price is below zero (NULL passes: "not measured").
select {{ column_name }} as value
from {{ model }}
where {{ column_name }} < 0
{% endtest %}
