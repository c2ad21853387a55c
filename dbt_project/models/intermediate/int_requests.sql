{{
  config(
    materialized='incremental',
    partition_by="toDate(requested_at, 'UTC')",
    order_by='(requested_at, trace_id)',
  )
}}
-- One row per request (trace): the gateway's root span for who/what/outcome, a column per gateway
-- stage, the upstream attempts (retries, fallbacks) and vLLM's llm_request of the attempt that
-- answered. A trace with vLLM spans but no gateway root (a client calling a replica directly)
-- is still a request: the GPU time it used is paid by someone; its customer and feature are NULL.
-- Spans are read from max_request_hours before the recomputed days, so a request that straddles
-- the start of the range keeps its root and is recomputed whole, not half.
{% set stages = ['auth', 'rate_limit', 'route', 'retrieval', 'prompt_assembly', 'postprocess'] %}
{% set read_from %}{{ recompute_from('requested_at') }} - toIntervalHour({{ var('max_request_hours') | int }}){% endset %}
{% set read_until %}{{ recompute_until() }} + toIntervalHour({{ var('max_request_hours') | int }}){% endset %}
with spans as (

    select *
    from {{ ref('stg_otel__spans') }}
    where started_at >= {{ read_from }} and started_at < {{ read_until }}

),

-- who, what, outcome: the gateway's root span
roots as (

    select
        trace_id,
        true as has_root,
        started_at as root_started_at,
        customer,
        feature,
        api_key_id,
        route,
        route_variant,
        stream,
        request_model as requested_model,
        http_status as root_http_status,
        error_type as root_error_type,
        input_tokens as gateway_input_tokens,
        output_tokens as gateway_output_tokens,
        finish_reasons,
        duration_ms as gateway_e2e_ms
    from spans
    where parent_span_id is null and service_name = 'fleetlens-gateway'
    limit 1 by trace_id

),

stages as (

    select
        trace_id,
        {% for stage in stages %}
        anyIf(toNullable(duration_ms), stage = '{{ stage }}') as {{ stage }}_ms{{ ',' if not loop.last }}
        {% endfor %}
    from spans
    where stage is not null and service_name = 'fleetlens-gateway'
    group by trace_id

),

-- upstream attempts: the last one is the one that answered (or failed last)
attempts as (

    select
        trace_id,
        true as has_attempts,
        count() as attempts,
        countIf(fallback_trigger is not null or status_code = 'error') as failed_attempts,
        sum(duration_ms) as upstream_ms,
        argMax(request_model, (attempt, started_at)) as served_model,
        argMax(model_variant, (attempt, started_at)) as upstream_model_variant,
        argMax(replica, (attempt, started_at)) as upstream_replica,
        argMax(time_to_first_chunk_s, (attempt, started_at)) as time_to_first_chunk_s,
        max(started_at) as last_attempt_at,
        uniqExact(request_model) > 1 as fell_back
    from spans
    where span_kind = 'client' and service_name = 'fleetlens-gateway'
    group by trace_id

),

-- vLLM: the last engine span if a retry reached the engine twice
engine as (

    select
        trace_id,
        true as has_engine,
        min(started_at) as engine_started_at,
        count() as engine_spans,
        argMax(replica, started_at) as engine_replica,
        argMax(service_name, started_at) as engine_service,
        argMax(model_variant, started_at) as engine_model_variant,
        argMax(response_model, started_at) as engine_model,
        argMax(input_tokens, started_at) as engine_input_tokens,
        argMax(output_tokens, started_at) as engine_output_tokens,
        argMax(engine_queue_s, started_at) * 1000 as engine_queue_ms,
        argMax(engine_prefill_s, started_at) * 1000 as engine_prefill_ms,
        argMax(engine_decode_s, started_at) * 1000 as engine_decode_ms,
        argMax(engine_ttft_s, started_at) * 1000 as engine_ttft_ms,
        argMax(duration_ms, started_at) as engine_e2e_ms
    from spans
    where span_name = 'llm_request'
    group by trace_id

),

keyed as (

    select
        *,
        has_root as through_gateway,
        if(has_root, root_started_at, engine_started_at) as requested_at
    from roots
    full outer join engine using (trace_id)

),

per_trace as (

    select *
    from keyed
    left join stages using (trace_id)
    left join attempts using (trace_id)

)

select
    trace_id,
    requested_at,
    through_gateway,
    customer,
    feature,
    api_key_id,
    route,
    route_variant,
    stream,
    requested_model,
    coalesce(served_model, engine_model, requested_model) as model,
    coalesce(upstream_model_variant, engine_model_variant) as model_variant,
    coalesce(upstream_replica, engine_replica,
             if(startsWith(engine_service, 'vllm-'), substring(engine_service, 6), null)) as replica,
    coalesce(root_http_status, if(through_gateway, null, 200)) as http_status,
    multiIf(http_status < 400, 'ok', http_status = 429, 'rate_limited', http_status < 500, 'client_error',
            'fleet_error') as status,
    root_error_type as error_type,
    finish_reasons,
    attempts,
    failed_attempts,
    fell_back,
    coalesce(gateway_input_tokens, engine_input_tokens, 0) as input_tokens,
    coalesce(gateway_output_tokens, engine_output_tokens, 0) as output_tokens,
    engine_input_tokens,
    engine_output_tokens,
    {% for stage in stages %}
    {{ stage }}_ms,
    {% endfor %}
    if(has_attempts, upstream_ms, null) as upstream_ms,
    engine_queue_ms,
    engine_prefill_ms,
    engine_decode_ms,
    engine_ttft_ms,
    if(has_engine, engine_e2e_ms, null) as engine_e2e_ms,
    -- time to first token as the client saw it: gateway work before the answering attempt, then
    -- that attempt's time to first chunk (streamed) or the engine's TTFT
    if(through_gateway and has_attempts,
       dateDiff('microsecond', requested_at, last_attempt_at) / 1000
         + coalesce(time_to_first_chunk_s * 1000, engine_ttft_ms),
       engine_ttft_ms) as ttft_ms,
    -- time per output token after the first (decode speed as the client felt it)
    if(coalesce(engine_output_tokens, output_tokens) > 1,
       engine_decode_ms / (coalesce(engine_output_tokens, output_tokens) - 1), null) as tpot_ms,
    if(has_root, gateway_e2e_ms, engine_e2e_ms) as e2e_ms

from per_trace
where requested_at >= {{ recompute_from('requested_at') }} and requested_at < {{ recompute_until() }}
