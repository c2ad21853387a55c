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
RETRIEVER = "fleetlens.retrieval.retriever"  # retrieval span: the retriever's name in routes.yaml
RETRIEVAL_DOCUMENT_IDS = "fleetlens.retrieval.document_ids"  # retrieval span: ids, best first
RETRIEVAL_CONTENT = "fleetlens.retrieval.content"  # retrieval span, record_content only: JSON passages
FALLBACK_TRIGGER = "fleetlens.fallback.trigger"  # failed upstream span: "error" / "timeout" / "overload"
POSTPROCESS_CHECK = "fleetlens.postprocess.check"  # postprocess span: "json_schema" / "json_object"
POSTPROCESS_VALID = "fleetlens.postprocess.valid"  # postprocess span: bool, the completion passed the check

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
# Content, only with record_content on (redacted first): JSON strings in the GenAI conventions' shape,
# [{"role": ..., "parts": [{"type": "text", "content": ...}]}] (output messages add "finish_reason")
INPUT_MESSAGES = "gen_ai.input.messages"  # upstream span
OUTPUT_MESSAGES = "gen_ai.output.messages"  # upstream span

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

# Replica lifecycle (written by `fleetlens serve replica`, service.name = fleetlens-replica):
#   replica.cold_start   one span per launch, from process start to the first good health check;
#                        its duration is the load time the cost models charge as cold-start dollars.
REPLICA_SERVICE = "fleetlens-replica"
COLD_START_SPAN = "replica.cold_start"
GPU_TYPE = "fleetlens.gpu.type"
GPU_COUNT = "fleetlens.gpu.count"
GPU_HOURLY_USD = "fleetlens.gpu.hourly_usd"
REPLICA_URL = "fleetlens.replica.url"
LOAD_SECONDS = "fleetlens.replica.load_seconds"
