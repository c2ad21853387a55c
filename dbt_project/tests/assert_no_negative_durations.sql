-- No stage, engine phase or end-to-end time is negative (a clock skew between gateway and
-- replica, or a bad attribute, would otherwise pass silently into every percentile).
{% set columns = ['auth_ms', 'rate_limit_ms', 'route_ms', 'retrieval_ms', 'prompt_assembly_ms', 'postprocess_ms',
                  'upstream_ms', 'engine_queue_ms', 'engine_prefill_ms', 'engine_decode_ms', 'engine_ttft_ms',
                  'engine_e2e_ms', 'ttft_ms', 'e2e_ms', 'engine_work_s'] %}
select trace_id, requested_at
from {{ ref('fct_requests') }}
where {% for c in columns %}{{ c }} < 0{{ ' or ' if not loop.last }}{% endfor %}
