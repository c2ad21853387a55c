{% test expression_is_true(model, expression) %}
-- Rows for which a boolean SQL expression over one row's columns is not true (false or NULL fail):
-- invariants between columns, e.g. `busy_s <= up_s`. Write NULL handling into the expression.
select *
from {{ model }}
where not coalesce(({{ expression }}), false)
{% endtest %}
