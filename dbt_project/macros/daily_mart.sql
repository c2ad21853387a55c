{#- The requests a daily mart recomputes: fct_requests rows of the days being replaced. -#}
{% macro fct_requests_to_recompute() -%}
    (
        select * from {{ ref('fct_requests') }}
        where requested_at >= {{ recompute_from('day') }} and requested_at < {{ recompute_until() }}
    )
{%- endmacro %}
