-- One fct_requests row per request: every trace that reached the gateway (a root span) or an
-- engine (an llm_request span) is there, and none twice.
with expected as (

    select uniqExact(trace_id) as traces
    from {{ ref('stg_otel__spans') }}
    where (parent_span_id is null and service_name = 'fleetlens-gateway') or span_name = 'llm_request'

),

actual as (

    select count() as rows, uniqExact(trace_id) as traces from {{ ref('fct_requests') }}

)

select expected.traces as expected_traces, actual.rows as fct_rows, actual.traces as fct_traces
from expected, actual
where actual.rows != expected.traces or actual.traces != actual.rows
