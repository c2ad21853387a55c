{% test between_zero_and_one(model, column_name) %}
-- Rows where a share, fraction or rate is outside [0, 1] (NULL passes: "not defined", e.g. a ratio
-- over zero requests or zero seconds).
select {{ column_name }} as value
from {{ model }}
where {{ column_name }} < 0 or {{ column_name }} > 1
{% endtest %}
