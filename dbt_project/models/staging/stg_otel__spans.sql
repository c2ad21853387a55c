-- Spans typed and renamed, attributes out of the maps; one row per (trace_id, span_id).
-- Duplicates happen: the collector's spool replays a batch whose acknowledgement was lost.
-- Attribute names: fleetlens.semconv (gateway) and vLLM's own (llm_request).
with source as (

    select * from {{ source('otel', 'otel_traces') }}

),

deduplicated as (

    select * from source
    order by Timestamp
    limit 1 by TraceId, SpanId

),

renamed as (

    select
        TraceId as trace_id,
        SpanId as span_id,
        nullIf(ParentSpanId, '') as parent_span_id,
        SpanName as span_name,
        SpanKind as span_kind,
        ServiceName as service_name,
        Timestamp as started_at,
        Duration as duration_ns,
        Duration / 1e6 as duration_ms,
        StatusCode as status_code,
        nullIf(StatusMessage, '') as status_message,

        -- who and why (gateway spans)
        nullIf(SpanAttributes['fleetlens.customer'], '') as customer,
        nullIf(SpanAttributes['fleetlens.feature'], '') as feature,
        nullIf(SpanAttributes['fleetlens.api_key_id'], '') as api_key_id,
        nullIf(SpanAttributes['fleetlens.route'], '') as route,
        nullIf(SpanAttributes['fleetlens.route.variant'], '') as route_variant,
        nullIf(SpanAttributes['fleetlens.stage'], '') as stage,
        toUInt8OrNull(SpanAttributes['fleetlens.attempt']) as attempt,
        nullIf(SpanAttributes['fleetlens.fallback.trigger'], '') as fallback_trigger,

        -- where it ran: the upstream span names the replica; vLLM and cold-start spans carry it as a resource
        nullIf(coalesce(nullIf(SpanAttributes['fleetlens.replica'], ''), ResourceAttributes['fleetlens.replica']), '') as replica,
        nullIf(coalesce(nullIf(SpanAttributes['fleetlens.model_variant'], ''),
                        ResourceAttributes['fleetlens.model_variant']), '') as model_variant,

        -- GenAI semantic conventions (vLLM still writes the older prompt/completion token names)
        nullIf(SpanAttributes['gen_ai.operation.name'], '') as operation,
        nullIf(SpanAttributes['gen_ai.request.model'], '') as request_model,
        nullIf(SpanAttributes['gen_ai.response.model'], '') as response_model,
        coalesce(toUInt32OrNull(SpanAttributes['gen_ai.usage.input_tokens']),
                 toUInt32OrNull(SpanAttributes['gen_ai.usage.prompt_tokens'])) as input_tokens,
        coalesce(toUInt32OrNull(SpanAttributes['gen_ai.usage.output_tokens']),
                 toUInt32OrNull(SpanAttributes['gen_ai.usage.completion_tokens'])) as output_tokens,
        nullIf(SpanAttributes['gen_ai.response.finish_reasons'], '') as finish_reasons,
        toFloat64OrNull(SpanAttributes['gen_ai.response.time_to_first_chunk']) as time_to_first_chunk_s,
        toUInt16OrNull(SpanAttributes['http.response.status_code']) as http_status,
        nullIf(SpanAttributes['error.type'], '') as error_type,

        -- vLLM's llm_request: where the engine spent the request's time
        toFloat64OrNull(SpanAttributes['gen_ai.latency.time_in_queue']) as engine_queue_s,
        toFloat64OrNull(SpanAttributes['gen_ai.latency.time_to_first_token']) as engine_ttft_s,
        toFloat64OrNull(SpanAttributes['gen_ai.latency.time_in_model_prefill']) as engine_prefill_s,
        toFloat64OrNull(SpanAttributes['gen_ai.latency.time_in_model_decode']) as engine_decode_s,
        toFloat64OrNull(SpanAttributes['gen_ai.latency.time_in_model_inference']) as engine_inference_s,

        -- replica.cold_start: what the replica runs on and how long it took to load
        nullIf(SpanAttributes['fleetlens.gpu.type'], '') as gpu_type,
        toUInt16OrNull(SpanAttributes['fleetlens.gpu.count']) as gpu_count,
        toFloat64OrNull(SpanAttributes['fleetlens.replica.load_seconds']) as load_seconds

    from deduplicated

)

select * from renamed
