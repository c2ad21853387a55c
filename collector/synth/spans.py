"""The trace shape: a `RequestFrame` as columnar span groups, the one description both encoders use.

`otlp.py` turns these groups into OTLP protobuf (typed attribute values), `direct.py` into
`otel_traces` rows (values stringified the way `collector.mapping` stringifies them). Because both
read the same groups, the shape below is defined once; the equality test checks the two encodings.

Groups (one per span type, rows sorted by request): the gateway root, one per stage present, the
upstream attempts (`chat {model}`, CLIENT) and vLLM's `llm_request` (SERVER, child of the attempt
that succeeded; attempts that failed have none, as vLLM writes the span only for finished requests).
Span names and attribute keys come from `fleetlens.semconv`; vLLM keys the contract does not name
are listed here (vLLM's own SpanAttributes).

Besides the requests' spans, a run has one `replica.cold_start` span per replica (`cold_start_group`):
what `fleetlens serve replica` writes when it launches a replica (serving/replica.py), with the
replica launched its load time before the run's start and ready exactly at it. Each is its own trace
(no parent), under its own resource (service.name = fleetlens-replica), and is emitted once per run,
not per chunk (`direct.cold_starts_table`, `otlp.cold_start_requests`).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from fleetlens import semconv as sc

from .generate import HTTP_5XX, OK, REFUSED, STAGE_COUNT, TIMEOUT, RequestFrame
from .tables import FINISH_REASONS, POLICIES, VARIANTS, FleetTables

KIND_INTERNAL, KIND_SERVER, KIND_CLIENT = 1, 2, 3  # opentelemetry.proto Span.SpanKind numbers
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2

# vLLM llm_request keys not in the contract. What vLLM 0.32 really sends (tests/fixtures/vllm/):
# no gen_ai.response.model, gen_ai.usage.num_sequences or time_in_scheduler/model_forward/execute,
# and no temperature when it is 0; request ids look like chatcmpl-b9711e00a4406883.
VLLM_TEMPERATURE = "gen_ai.request.temperature"
VLLM_TOP_P = "gen_ai.request.top_p"
VLLM_N = "gen_ai.request.n"
VLLM_REQUEST_ID_PREFIX = "chatcmpl-"
VLLM_REQUEST_ID_BYTES = 8

# OpenTelemetry exception event (semantic conventions)
EXCEPTION_EVENT = "exception"
EXCEPTION_TYPE = "exception.type"
EXCEPTION_MESSAGE = "exception.message"

GATEWAY_SCOPE_NAME = "fleetlens.gateway"
REPLICA_SCOPE = ("fleetlens.replica", "")  # serving/replica.py: tracer_provider.get_tracer("fleetlens.replica")
COLD_START_STREAM = 0xC01D5  # seeds the cold starts' random stream: (seed, this, replica code)
COLD_START_Z_MAX = 2.0  # load times are clipped to median × exp(±sigma × this)
VLLM_SCOPE = ("vllm.tracing.otel", "")
SDK_ATTRIBUTES = {"telemetry.sdk.language": "python", "telemetry.sdk.name": "opentelemetry",
                  "telemetry.sdk.version": "1.45.2"}
VLLM_PORT = 8000

ERROR_STATUSES = (401, 429, 502, 504)
ATTEMPT_ERROR_TYPES = ("500", "503", "httpx.ReadTimeout", "httpx.ConnectError")
ATTEMPT_STATUS_MESSAGES = ("HTTP 500", "HTTP 503", "timed out", "All connection attempts failed")
ROOT_STATUS_MESSAGES = ("upstream failed", "upstream timed out")


@dataclass
class Attr:
    """One attribute key over a group's spans.

    kind: `cat` codes into `labels` (any Python value: str, int, float, bool, tuple of str; code -1 =
    absent); `int` int64 values; `micros` a double in seconds given as integer microseconds (so its
    text form is exact and vectorizable); `hex` (n, k) bytes written as `prefix` + lowercase hex.
    """

    key: str
    kind: Literal["cat", "int", "micros", "hex"]
    values: np.ndarray
    labels: tuple[Any, ...] = ()
    present: np.ndarray | None = None
    prefix: str = ""

    def mask(self, n: int) -> np.ndarray:
        if self.kind == "cat":
            return self.values >= 0
        return np.ones(n, dtype=bool) if self.present is None else self.present


@dataclass
class Events:
    """At most one event per span (the exception of a failed attempt)."""

    present: np.ndarray
    time_ns: np.ndarray
    name: str
    attrs: list[Attr]

    def __post_init__(self) -> None:
        self.attrs = sorted(self.attrs, key=lambda a: a.key.encode())


@dataclass
class SpanGroup:
    label: str
    request: np.ndarray  # row of the span's request in the frame, ascending
    trace_id: np.ndarray  # (n, 16) uint8
    span_id: np.ndarray  # (n, 8) uint8
    parent_id: np.ndarray | None  # (n, 8) uint8; None for roots
    name_codes: np.ndarray
    name_labels: tuple[str, ...]
    kind: int
    resource: np.ndarray  # index into `resources(tables)`
    scope: tuple[str, str]
    start_ns: np.ndarray
    end_ns: np.ndarray
    status: np.ndarray  # STATUS_* per span
    message_codes: np.ndarray  # -1 = empty status message
    message_labels: tuple[str, ...]
    attrs: list[Attr]
    events: Events | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.attrs = sorted(self.attrs, key=lambda a: a.key.encode())  # the exporter's (sorted) map order

    def __len__(self) -> int:
        return len(self.request)


def resources(tables: FleetTables, seed: int) -> list[dict[str, Any]]:
    """Resource attributes: index 0 the gateway, 1 + r vLLM replica r (as vLLM's API server sets
    them: SDK defaults, OTEL_SERVICE_NAME, an instance id and pid, fixed here per seed and replica)."""
    gateway = {"service.name": sc.GATEWAY_SERVICE, "service.version": tables.fleet.gateway_version,
               **SDK_ATTRIBUTES}
    out = [gateway]
    for r, replica in enumerate(tables.replicas):
        rng = np.random.default_rng([seed, 0x5E41CE, r])
        out.append({"service.name": f"{sc.VLLM_SERVICE_PREFIX}{replica}",
                    "service.instance.id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
                    "vllm.instrumenting_module_name": "vllm.llm_engine",
                    "vllm.process_id": str(int(rng.integers(1000, 60000))), **SDK_ATTRIBUTES})
    return out


def replica_url(replica: str) -> str:
    """The URL a replica is served on (fleetlens.replica.url), matching the upstream spans' server.address/port."""
    return f"http://{replica}.vllm.internal:{VLLM_PORT}"


def cold_start_resources(tables: FleetTables) -> list[dict[str, Any]]:
    """Resource attributes of replica r's launcher (index r): service.name = fleetlens-replica, SDK defaults,
    and the replica, its variant and model as serving/replica.py's `plan_replica` states them."""
    return [{"service.name": sc.REPLICA_SERVICE, sc.REPLICA: name, sc.MODEL_VARIANT: model.variant,
             sc.REQUEST_MODEL: model.name, **SDK_ATTRIBUTES} for name, model in tables.fleet.replicas]


def _cat(key: str, codes: np.ndarray, labels: tuple[Any, ...], where: np.ndarray | None = None) -> Attr:
    codes = codes.astype(np.int32)
    if where is not None:
        codes = np.where(where, codes, -1)
    return Attr(key, "cat", codes, labels)


def _const(key: str, value: Any, n: int) -> Attr:
    return Attr(key, "cat", np.zeros(n, dtype=np.int32), (value,))


def _int(key: str, values: np.ndarray, where: np.ndarray | None = None) -> Attr:
    return Attr(key, "int", values.astype(np.int64), present=where)


def _micros(key: str, values: np.ndarray) -> Attr:
    return Attr(key, "micros", values.astype(np.int64))


def _codes(values: np.ndarray, labels: tuple[int, ...]) -> np.ndarray:
    """Position of each value in `labels`, -1 where it is not one of them."""
    table = np.array(labels)
    pos = np.minimum(np.searchsorted(table, values), len(table) - 1)
    return np.where(table[pos] == values, pos, -1)


def cold_start_group(tables: FleetTables, seed: int, ready_ns: int) -> SpanGroup:
    """One `replica.cold_start` span per replica (row r = replica code r), ready at `ready_ns`.

    Replica r's load time is its model's `load_seconds` × a log-normal factor (shape
    `fleet.cold_start_sigma`, clipped to ±COLD_START_Z_MAX sigmas), in whole milliseconds; its trace
    and span ids come from the same per-(seed, replica) stream, so they do not depend on the chunking
    or on anything else in the run. Attributes and value types are those of
    `ReplicaLauncher._record_cold_start`; `resource` indexes `cold_start_resources(tables)`."""
    fleet = tables.fleet
    r = len(tables.replicas)
    rows = np.arange(r)
    load_us = np.zeros(r, dtype=np.int64)
    trace_id = np.zeros((r, 16), dtype=np.uint8)
    span_id = np.zeros((r, 8), dtype=np.uint8)
    for i, (_, model) in enumerate(fleet.replicas):
        rng = np.random.default_rng([seed, COLD_START_STREAM, i])
        z = min(max(float(rng.standard_normal()), -COLD_START_Z_MAX), COLD_START_Z_MAX)
        load_us[i] = 1000 * round(model.load_seconds * 1000 * math.exp(fleet.cold_start_sigma * z))
        ids = np.frombuffer(rng.bytes(24), dtype=np.uint8)
        trace_id[i], span_id[i] = ids[:16], ids[16:]
        for ident in (trace_id[i], span_id[i]):
            if not ident.any():  # all-zero ids are invalid in OTLP
                ident[-1] = 1
    model = tables.replica_model.astype(np.int32)
    models = fleet.models
    attrs = [
        _cat(sc.REPLICA, rows, tables.replicas),
        _cat(sc.REQUEST_MODEL, model, tables.models),
        _cat(sc.MODEL_VARIANT, model, tuple(m.variant for m in models)),
        _cat(sc.REPLICA_URL, rows, tuple(replica_url(name) for name in tables.replicas)),
        _cat(sc.GPU_TYPE, model, tuple(m.gpu for m in models)),
        _int(sc.GPU_COUNT, np.array([m.gpus for m in models], dtype=np.int64)[model]),
        _micros(sc.LOAD_SECONDS, load_us),
        _cat(sc.GPU_HOURLY_USD, model, tuple(float(m.gpu_hour_usd) for m in models)),
    ]
    end = np.full(r, ready_ns, dtype=np.int64)
    return SpanGroup(
        "cold_start", rows, trace_id, span_id, None, np.zeros(r, dtype=np.int32), (sc.COLD_START_SPAN,),
        KIND_INTERNAL, rows.astype(np.int32), REPLICA_SCOPE, end - load_us * 1000, end,
        np.full(r, STATUS_OK, dtype=np.int8), np.full(r, -1), (), attrs)


def span_groups(frame: RequestFrame) -> list[SpanGroup]:
    """Every span of the frame's requests, grouped by span type."""
    t = frame.tables
    n = len(frame)
    rows = np.arange(n)
    gateway_scope = (GATEWAY_SCOPE_NAME, t.fleet.gateway_version)
    root_id = frame.span_ids[:, 0]
    end_ns = frame.arrival_ns + frame.duration_us * 1000
    last = np.maximum(frame.attempts.astype(np.int64) - 1, 0)
    final_model = np.where(frame.success, frame.att_model[rows, last], -1)
    finish_labels = tuple((reason,) for reason in FINISH_REASONS)
    ok = frame.success
    gateway = np.zeros(n, dtype=np.int32)

    status_code = np.where(frame.status >= 500, STATUS_ERROR, STATUS_UNSET).astype(np.int8)
    root_message = np.select([frame.status == 502, frame.status == 504], [0, 1], -1)
    groups = [SpanGroup(
        "root", rows, frame.trace_id, root_id, None, np.zeros(n, dtype=np.int32), (sc.ROOT_SPAN,), KIND_SERVER,
        gateway, gateway_scope, frame.arrival_ns, end_ns, status_code, root_message, ROOT_STATUS_MESSAGES, [
            _cat(sc.API_KEY_ID, frame.api_key, t.api_keys),
            _cat(sc.CUSTOMER, frame.customer, t.customers),
            _cat(sc.FEATURE, frame.feature, t.features),
            _cat(sc.STREAM, frame.stream.astype(np.int32), (False, True)),
            _int(sc.HTTP_STATUS_CODE, frame.status),
            _cat(sc.ERROR_TYPE, _codes(frame.status, ERROR_STATUSES), tuple(str(s) for s in ERROR_STATUSES)),
            _const(sc.OPERATION_NAME, "chat", n),
            _const(sc.PROVIDER_NAME, "vllm", n),
            _cat(sc.REQUEST_MODEL, frame.model, t.models),
            _int(sc.REQUEST_MAX_TOKENS, frame.max_tokens),
            _cat(sc.RESPONSE_MODEL, final_model, t.models),
            _int(sc.USAGE_INPUT_TOKENS, frame.prompt_tokens, ok),
            _int(sc.USAGE_OUTPUT_TOKENS, frame.output_tokens, ok),
            _cat(sc.RESPONSE_FINISH_REASONS, frame.finish, finish_labels, ok),
            _cat(sc.ROUTE, frame.policy, POLICIES),
            _cat(sc.ROUTE_VARIANT, frame.variant, VARIANTS),
        ])]

    for stage in range(STAGE_COUNT):
        sel = np.flatnonzero(frame.stage_start_us[:, stage] >= 0)
        m = len(sel)
        name = sc.STAGES[stage]
        attrs = [_const(sc.STAGE, name, m)]
        if name == "route":
            attrs += [_cat(sc.ROUTE, frame.policy[sel], POLICIES),
                      _cat(sc.ROUTE_VARIANT, frame.variant[sel], VARIANTS),
                      _cat(sc.REQUEST_MODEL, frame.model[sel], t.models)]
        elif name == "retrieval":
            attrs.append(_int(sc.RETRIEVAL_DOCUMENTS, frame.documents[sel]))
        start = frame.arrival_ns[sel] + frame.stage_start_us[sel, stage] * 1000
        groups.append(SpanGroup(
            f"stage:{name}", sel, frame.trace_id[sel], frame.span_ids[sel, 1 + stage], root_id[sel],
            np.zeros(m, dtype=np.int32), (name,), KIND_INTERNAL, gateway[:m], gateway_scope, start,
            start + frame.stage_dur_us[sel, stage] * 1000, np.zeros(m, dtype=np.int8), np.full(m, -1), (), attrs))

    groups.append(_attempts(frame, root_id, finish_labels))
    groups.append(_llm_requests(frame, last))
    return groups


def _attempts(frame: RequestFrame, root_id: np.ndarray, finish_labels: tuple[Any, ...]) -> SpanGroup:
    t = frame.tables
    A = frame.att_model.shape[1]
    req, att = np.nonzero(frame.att_outcome >= 0)  # row-major: by request, then attempt
    m = len(req)
    model = frame.att_model[req, att]
    replica = frame.att_replica[req, att]
    outcome = frame.att_outcome[req, att]
    status = frame.att_status[req, att]
    ok = outcome == OK
    failure = np.select([(outcome == HTTP_5XX) & (status == 500), outcome == HTTP_5XX, outcome == TIMEOUT,
                         outcome == REFUSED], [0, 1, 2, 3], -1)
    start = frame.arrival_ns[req] + frame.att_start_us[req, att] * 1000
    end = start + frame.att_dur_us[req, att] * 1000
    raised = (outcome == TIMEOUT) | (outcome == REFUSED)
    events = Events(raised, end, EXCEPTION_EVENT, [
        _cat(EXCEPTION_TYPE, failure, ATTEMPT_ERROR_TYPES, raised),
        _cat(EXCEPTION_MESSAGE, failure, ATTEMPT_STATUS_MESSAGES, raised),
    ])
    attrs = [
        _int(sc.ATTEMPT, att + 1),
        _cat(sc.REPLICA, replica, t.replicas),
        _cat(sc.ERROR_TYPE, failure, ATTEMPT_ERROR_TYPES),
        _const(sc.OPERATION_NAME, "chat", m),
        _const(sc.PROVIDER_NAME, "vllm", m),
        _int(sc.REQUEST_MAX_TOKENS, frame.max_tokens[req]),
        _cat(sc.REQUEST_MODEL, model, t.models),
        _cat(sc.RESPONSE_MODEL, model, t.models, ok),
        _int(sc.USAGE_INPUT_TOKENS, frame.prompt_tokens[req], ok),
        _int(sc.USAGE_OUTPUT_TOKENS, frame.output_tokens[req], ok),
        _cat(sc.RESPONSE_FINISH_REASONS, frame.finish[req], finish_labels, ok),
        _int(sc.HTTP_STATUS_CODE, status, status > 0),
        _cat(sc.SERVER_ADDRESS, replica, tuple(f"{r}.vllm.internal" for r in t.replicas)),
        _const(sc.SERVER_PORT, VLLM_PORT, m),
    ]
    return SpanGroup(
        "upstream", req, frame.trace_id[req], frame.span_ids[req, 1 + STAGE_COUNT + att], root_id[req],
        model.astype(np.int32), tuple(f"{sc.UPSTREAM_SPAN_PREFIX}{name}" for name in t.models), KIND_CLIENT,
        np.zeros(m, dtype=np.int32), (GATEWAY_SCOPE_NAME, t.fleet.gateway_version), start, end,
        np.where(ok, STATUS_UNSET, STATUS_ERROR).astype(np.int8), failure, ATTEMPT_STATUS_MESSAGES, attrs,
        events, extra={"attempts": A})


def _llm_requests(frame: RequestFrame, last: np.ndarray) -> SpanGroup:
    t = frame.tables
    A = frame.att_model.shape[1]
    req = np.flatnonzero(frame.success)
    m = len(req)
    att = last[req]
    replica = frame.att_replica[req, att]
    start = frame.arrival_ns[req] + frame.v_start_us[req] * 1000
    e2e, ttft = frame.e2e_us[req], frame.ttft_us[req]
    queue, prefill, decode = frame.queue_us[req], frame.prefill_us[req], frame.decode_us[req]
    temperature = frame.temperature[req]
    attrs = [
        _micros(sc.VLLM_E2E, e2e),
        _micros(sc.VLLM_TIME_IN_MODEL_DECODE, decode),
        _micros(sc.VLLM_TIME_IN_MODEL_INFERENCE, prefill + decode),
        _micros(sc.VLLM_TIME_IN_MODEL_PREFILL, prefill),
        _micros(sc.VLLM_TIME_IN_QUEUE, queue),
        _micros(sc.VLLM_TIME_TO_FIRST_TOKEN, ttft),
        Attr(sc.VLLM_REQUEST_ID, "hex", frame.vllm_request_id[req, :VLLM_REQUEST_ID_BYTES],
             prefix=VLLM_REQUEST_ID_PREFIX),
        _int(sc.REQUEST_MAX_TOKENS, frame.max_tokens[req]),
        _const(VLLM_N, 1, m),
        _cat(VLLM_TEMPERATURE, temperature, t.temperatures, np.array(t.temperatures)[temperature] != 0.0),
        _cat(VLLM_TOP_P, frame.top_p[req], t.top_ps),
        _int(sc.VLLM_COMPLETION_TOKENS, frame.output_tokens[req]),
        _int(sc.VLLM_PROMPT_TOKENS, frame.prompt_tokens[req]),
    ]
    return SpanGroup(
        "llm_request", req, frame.trace_id[req], frame.span_ids[req, 1 + STAGE_COUNT + A],
        frame.span_ids[req, 1 + STAGE_COUNT + att], np.zeros(m, dtype=np.int32), (sc.VLLM_SPAN,), KIND_SERVER,
        (1 + replica).astype(np.int32), VLLM_SCOPE, start, start + e2e * 1000, np.zeros(m, dtype=np.int8),
        np.full(m, -1), (), attrs)
