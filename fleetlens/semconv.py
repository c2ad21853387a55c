"""The shape of FleetLens telemetry: span names and attribute keys shared by the gateway, the
synthesizer and the dbt models.

One request through the gateway is one trace:

    POST /v1/chat/completions            SERVER  service.name = fleetlens-gateway   (root)
    ├── auth                             INTERNAL
    ├── rate_limit                       INTERNAL
    ├── route                            INTERNAL
    ├── retrieval                        INTERNAL  (features that use RAG only)
    ├── prompt_assembly                  INTERNAL
    ├── chat {model}                     CLIENT    one per upstream attempt (retries, fallbacks)
    │   └── llm_request                  SERVER    service.name = vllm-{replica}, written by vLLM itself
    └── postprocess                      INTERNAL

Keys follow the OpenTelemetry GenAI semantic conventions where one exists (`gen_ai.*`); what the
conventions do not cover (who pays, which product feature, which replica) lives under
`fleetlens.*`. vLLM's own `llm_request` span uses vLLM's key names (`gen_ai.usage.prompt_tokens`,
`gen_ai.latency.*`), listed under `VLLM_*` here so models and tests name them in one place.
"""

from __future__ import annotations

GATEWAY_SERVICE = "fleetlens-gateway"
VLLM_SERVICE_PREFIX = "vllm-"  # OTEL_SERVICE_NAME of a replica = vllm-{replica}

# Span names
ROOT_SPAN = "POST /v1/chat/completions"
STAGES = ("auth", "rate_limit", "route", "retrieval", "prompt_assembly", "postprocess")
UPSTREAM_SPAN_PREFIX = "chat "  # "chat {gen_ai.request.model}", GenAI client span
VLLM_SPAN = "llm_request"

# FleetLens attributes (root span unless noted)
CUSTOMER = "fleetlens.customer"
FEATURE = "fleetlens.feature"
API_KEY_ID = "fleetlens.api_key_id"  # the key's id, never the key
ROUTE = "fleetlens.route"  # route span and root: which rule chose the model ("default", "cascade", ...)
ROUTE_VARIANT = "fleetlens.route.variant"  # "baseline" / "canary"
MODEL_VARIANT = "fleetlens.model_variant"  # upstream span: precision/quantization variant ("bf16", "int8", ...)
STAGE = "fleetlens.stage"  # on every stage span: its stage name
REPLICA = "fleetlens.replica"  # upstream span: the replica that served the attempt
ATTEMPT = "fleetlens.attempt"  # upstream span: 1, 2, ... for retries and fallbacks
STREAM = "fleetlens.stream"  # root: bool
RETRIEVAL_DOCUMENTS = "fleetlens.retrieval.documents"  # retrieval span: documents returned

# GenAI semantic conventions (root and upstream spans)
OPERATION_NAME = "gen_ai.operation.name"  # "chat"
PROVIDER_NAME = "gen_ai.provider.name"  # "vllm" (latest GenAI conventions; was gen_ai.system)
REQUEST_MODEL = "gen_ai.request.model"
RESPONSE_MODEL = "gen_ai.response.model"
REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"  # upstream span of a streamed call, seconds
HTTP_STATUS_CODE = "http.response.status_code"
ERROR_TYPE = "error.type"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"

# vLLM's llm_request span (vllm/tracing.py SpanAttributes)
VLLM_REQUEST_ID = "gen_ai.request.id"
VLLM_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"
VLLM_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
VLLM_TIME_IN_QUEUE = "gen_ai.latency.time_in_queue"
VLLM_TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"
VLLM_E2E = "gen_ai.latency.e2e"
VLLM_TIME_IN_MODEL_PREFILL = "gen_ai.latency.time_in_model_prefill"
VLLM_TIME_IN_MODEL_DECODE = "gen_ai.latency.time_in_model_decode"
VLLM_TIME_IN_MODEL_INFERENCE = "gen_ai.latency.time_in_model_inference"
