"""Collector throughput: OTLP/HTTP and OTLP/gRPC → `fleetlens collector` → embedded warehouse.

    .venv/bin/python bench/collector_throughput.py [--duration 60] [--protocol http|grpc|both]
        [--rate max|SPANS_PER_S] [--workers 2] [--spans-per-request 500] [--connections 4]
        [--profile] [--phoenix] [--json results.json]

    # the bar: does the pipeline keep up with 30,000 spans/s for 60 s?
    .venv/bin/python bench/collector_throughput.py --rate 30000 --duration 60
    # the ceiling: how fast is data written while senders push as fast as they are acknowledged?
    .venv/bin/python bench/collector_throughput.py --rate max --duration 30 --profile

Starts `fleetlens warehouse serve` (temp dir, free port), migrates a database, starts
`fleetlens collector` on free ports (every child in its own process group, always stopped),
pre-builds serialized OTLP requests (so the sender costs little CPU), then pushes them for
`--warmup` + `--duration` seconds, at `--rate` spans/s or as fast as they are acknowledged, over
`--connections` keep-alive connections per protocol. 429/503 (RESOURCE_EXHAUSTED/UNAVAILABLE)
answers are honoured (Retry-After / RetryInfo), counted, and the request is sent again.

Measured over the window (after the warm-up):
- acked spans/s: spans of requests answered 200/OK (fsynced in the collector's spool);
- written spans/s: rows that became queryable in `otel_traces` (`SELECT count()` at the window's
  ends; in between, every second, the collector's written counter, to spare the warehouse), and
  the backlog (acked − queryable spans; spool bytes) at the start and end, with its slope over
  the window's second half. Sustained = written ≥ 95 % of acked and the backlog grows by less
  than 2 % of the acked rate or ends under 2 s of traffic (batches make it a sawtooth). With
  `--rate max` the receivers outrun the writers by design: that run measures the write ceiling;
- ingest delay send → queryable: every `--marker-interval` s one request carries an extra
  `bench.marker` span with a unique SpanId (a second serialized message appended to the body,
  which protobuf merges into the same request, so markers ride in real batches at no encoding
  cost); a poller looks for pending markers with one primary-key query (ServiceName, SpanName
  lead the sort key), every `--poll-interval` s or a tenth of the oldest pending marker's age;
- CPU by process (psutil deltas): collector main (per thread), writer processes, warehouse, this
  bench, py-spy, and the rest of the machine; and CPU µs per span, which unlike spans/s barely
  depends on what else the machine runs. Only a quiet machine gives comparable spans/s.

After the window the senders stop and the bench waits (≤ `--drain-timeout`) until every acked
span is queryable, which also gives late markers their delay.

--profile runs one `py-spy record` per pipeline process for the window and prints the top
functions by self time: collector main (GIL-holding samples, by thread), writers and warehouse
(active samples); collapsed stacks go to `--profile-dir` (flamegraph.pl / speedscope input) and a
text summary to bench/profiles/.

--phoenix (needs `arize-phoenix` in .venv-phoenix, a separate venv) then starts `phoenix serve`
(temp working dir, free ports), offers it the same payloads at `--phoenix-rate` for
`--phoenix-duration` s, counts queryable spans and markers in its SQLite database, and prints
FleetLens ÷ Phoenix ratios.

Payloads come from the traffic synthesizer (`fleetlens.collector.synth`: gateway stage spans and
vLLM llm_request spans, whole traces per request) when it is importable, else from the built-in
generator below (same trace shape, 6-15 GenAI/FleetLens attributes a span).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import clickhouse_connect
import grpc
import numpy as np
import psutil
from google.rpc import error_details_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from fleetlens import net
from fleetlens import semconv as sc
from fleetlens.config import WarehouseURL
from fleetlens.net import free_port
from fleetlens.warehouse.client import WarehouseUnavailable, wait_until_ready

REPO = Path(__file__).resolve().parent.parent
PHOENIX_VENV = REPO / ".venv-phoenix"
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
DATABASE = "fleetlens_bench"
MARKER_SERVICE, MARKER_SPAN = "fleetlens-bench", "bench.marker"
SUSTAINED_WRITTEN_SHARE = 0.95
SUSTAINED_SLOPE_SHARE = 0.02
BAR_SPANS_PER_S, GOAL_SPANS_PER_S = 30_000, 100_000
REFERENCE = "Go OpenTelemetry Collector ~137K spans/s per core, no database beside it"
BENCH = "bench (senders, pollers)"

console = Console(width=150)


# ======================================================================= payloads
@dataclass(frozen=True)
class Payload:
    body: bytes
    spans: int


def build_payloads(source: str, count: int, spans_per_request: int, seed: int) -> tuple[list[Payload], str]:
    """`count` serialized requests of about `spans_per_request` spans, built before any timing."""
    total = count * spans_per_request
    requests, origin = (synth_requests(seed, total, spans_per_request) if source != "builtin" else None), ""
    if requests is not None:
        origin = "traffic synthesizer (fleetlens.collector.synth)"
    elif source == "synth":
        raise SystemExit("--payload synth: fleetlens.collector.synth is not usable here")
    else:
        origin = "built-in generator"
        requests = rechunk([builtin_request(random.Random(seed), traces=total // 8 + 1)], spans_per_request)
    return [Payload(r.SerializeToString(), span_count(r)) for r in itertools.islice(requests, count)], origin


def synth_requests(seed: int, spans: int, spans_per_request: int
                   ) -> Iterator[ExportTraceServiceRequest] | None:
    """The synthesizer's requests (whole traces, at most `spans_per_request` spans each), or None
    where it is absent or its interface differs from what this bench was written against."""
    try:
        from fleetlens.collector.synth.generate import generate
        from fleetlens.collector.synth.otlp import export_requests

        start = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
        frames = generate(seed, start, n_requests=spans // 8 + 1)  # ~8-10 spans a gateway request
        requests = (r for frame in frames for r in export_requests(frame, max_spans=spans_per_request))
        first = next(requests)
    except Exception as error:  # noqa: BLE001 - a synthesizer in progress must not break the bench
        console.print(f"[yellow]traffic synthesizer not usable ({error!r}); built-in generator[/yellow]")
        return None
    return itertools.chain([first], requests)


def span_count(request: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


def rechunk(requests: Iterable[ExportTraceServiceRequest], size: int) -> Iterator[ExportTraceServiceRequest]:
    """The same spans re-cut into requests of `size` spans, each span kept under its resource and
    scope (consecutive spans of one resource/scope share one ResourceSpans/ScopeSpans)."""
    out, n = ExportTraceServiceRequest(), 0
    for request in requests:
        for rs in request.resource_spans:
            target_rs = None
            for ss in rs.scope_spans:
                target_ss = None
                for span in ss.spans:
                    if target_rs is None:
                        target_rs = out.resource_spans.add(resource=rs.resource, schema_url=rs.schema_url)
                    if target_ss is None:
                        target_ss = target_rs.scope_spans.add(scope=ss.scope, schema_url=ss.schema_url)
                    target_ss.spans.append(span)
                    n += 1
                    if n == size:
                        yield out
                        out, n, target_rs, target_ss = ExportTraceServiceRequest(), 0, None, None
    if n:
        yield out


# --- the built-in generator: one gateway request = one trace, as fleetlens/semconv.py describes
MODELS = (("llama-3.1-8b-instruct", "l8b", 4), ("llama-3.1-70b-instruct", "l70b", 2),
          ("qwen2.5-32b-instruct", "q32b", 2))
FEATURES = (("chat", False), ("summarize", False), ("support-rag", True), ("code-assist", False),
            ("classify", False), ("search-rag", True))
CUSTOMERS = tuple(f"cust-{i:03d}" for i in range(48))
STAGE_MS = {"auth": 2.0, "rate_limit": 0.5, "route": 1.0, "retrieval": 80.0, "prompt_assembly": 3.0,
            "postprocess": 2.0}
GATEWAY_SCOPE = InstrumentationScope(name="fleetlens.gateway", version="0.1.0")
VLLM_SCOPE = InstrumentationScope(name="vllm.llm_engine")
SDK = {"telemetry.sdk.language": "python", "telemetry.sdk.name": "opentelemetry",
       "telemetry.sdk.version": "1.45.2"}


def kv(key: str, value: Any) -> KeyValue:
    """One OTLP attribute with the typed value an OTel SDK sends."""
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, float):
        return KeyValue(key=key, value=AnyValue(double_value=value))
    if isinstance(value, (list, tuple)):
        items = ArrayValue(values=[AnyValue(string_value=v) for v in value])
        return KeyValue(key=key, value=AnyValue(array_value=items))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def _span(span_id: bytes, trace_id: bytes, parent: bytes, name: str, kind: int, start_ns: int, dur_ns: int,
          attrs: dict[str, Any]) -> Span:
    return Span(trace_id=trace_id, span_id=span_id, parent_span_id=parent, name=name, kind=kind,
                start_time_unix_nano=start_ns, end_time_unix_nano=start_ns + dur_ns,
                attributes=[kv(k, v) for k, v in attrs.items()])


def builtin_trace(rng: random.Random, now_ns: int) -> tuple[list[Span], str, Span]:
    """One gateway request: (its gateway spans, the replica that served it, vLLM's llm_request)."""
    model, short, replicas = rng.choice(MODELS)
    feature, rag = rng.choice(FEATURES)
    customer = rng.choice(CUSTOMERS)
    replica = f"{short}-{rng.randrange(replicas)}"
    prompt, output = int(rng.lognormvariate(6.5, 0.9)) + 1, int(rng.lognormvariate(5.0, 0.8)) + 1
    queue_s, prefill_s, decode_s = rng.expovariate(20), prompt / 4000, output / 40
    upstream_ns = int((queue_s + prefill_s + decode_s) * 1e9) + 200_000
    trace_id, root_id = rng.randbytes(16), rng.randbytes(8)
    start = now_ns - rng.randrange(60 * 10**9)
    common = {sc.CUSTOMER: customer, sc.FEATURE: feature}
    spans, cursor, upstream_start = [], start + 100_000, 0
    for stage, ms in STAGE_MS.items():
        if stage == "retrieval" and not rag:
            continue
        if stage == "postprocess":
            upstream_start, cursor = cursor, cursor + upstream_ns
        dur = int(rng.expovariate(1 / ms) * 1e6) + 1000
        attrs = {sc.STAGE: stage, **common, "code.function": f"gateway.{stage}",
                 "fleetlens.gateway.instance": f"gw-{rng.randrange(3)}"}
        if stage == "route":
            attrs |= {sc.ROUTE: "default", sc.ROUTE_VARIANT: "baseline", sc.REQUEST_MODEL: model}
        elif stage == "retrieval":
            attrs |= {sc.RETRIEVAL_DOCUMENTS: rng.randrange(1, 12), "db.system": "qdrant"}
        elif stage == "auth":
            attrs |= {sc.API_KEY_ID: f"key-{customer}-{rng.randrange(3)}"}
        spans.append(_span(rng.randbytes(8), trace_id, root_id, stage, Span.SPAN_KIND_INTERNAL, cursor, dur,
                           attrs))
        cursor += dur
    genai = {sc.OPERATION_NAME: "chat", sc.PROVIDER_NAME: "vllm", sc.REQUEST_MODEL: model, sc.RESPONSE_MODEL: model,
             sc.REQUEST_MAX_TOKENS: 1024, sc.USAGE_INPUT_TOKENS: prompt, sc.USAGE_OUTPUT_TOKENS: output,
             sc.RESPONSE_FINISH_REASONS: ["stop"], sc.HTTP_STATUS_CODE: 200}
    upstream = {**genai, sc.REPLICA: replica, sc.ATTEMPT: 1, sc.SERVER_ADDRESS: f"{replica}.vllm",
                sc.SERVER_PORT: 8000}
    chat = _span(rng.randbytes(8), trace_id, root_id, f"{sc.UPSTREAM_SPAN_PREFIX}{model}",
                 Span.SPAN_KIND_CLIENT, upstream_start, upstream_ns, upstream)
    llm = _span(rng.randbytes(8), trace_id, chat.span_id, sc.VLLM_SPAN, Span.SPAN_KIND_SERVER,
                upstream_start + 100_000, upstream_ns - 150_000, {
                    sc.VLLM_REQUEST_ID: f"chatcmpl-{rng.randbytes(8).hex()}", sc.REQUEST_MODEL: model,
                    sc.RESPONSE_MODEL: model, sc.REQUEST_MAX_TOKENS: 1024, "gen_ai.request.temperature": 0.7,
                    "gen_ai.request.top_p": 1.0, "gen_ai.request.n": 1, sc.VLLM_PROMPT_TOKENS: prompt,
                    sc.VLLM_COMPLETION_TOKENS: output, sc.VLLM_TIME_IN_QUEUE: queue_s,
                    sc.VLLM_TIME_TO_FIRST_TOKEN: queue_s + prefill_s,
                    sc.VLLM_E2E: queue_s + prefill_s + decode_s, sc.VLLM_TIME_IN_MODEL_PREFILL: prefill_s,
                    sc.VLLM_TIME_IN_MODEL_DECODE: decode_s,
                    sc.VLLM_TIME_IN_MODEL_INFERENCE: prefill_s + decode_s})
    root = _span(root_id, trace_id, b"", sc.ROOT_SPAN, Span.SPAN_KIND_SERVER, start, cursor + 100_000 - start,
                 {**genai, **common, sc.API_KEY_ID: f"key-{customer}-0", sc.ROUTE: "default",
                  sc.ROUTE_VARIANT: "baseline", sc.STREAM: rng.random() < 0.6})
    return [root, *spans, chat], replica, llm


def builtin_request(rng: random.Random, traces: int) -> ExportTraceServiceRequest:
    """Many traces in one request: gateway spans under the gateway's resource, llm_request spans
    under their replica's resource, as an OTel pipeline batches them."""
    now_ns = time.time_ns()
    gateway: list[Span] = []
    by_replica: dict[str, list[Span]] = {}
    for _ in range(traces):
        spans, replica, llm = builtin_trace(rng, now_ns)
        gateway.extend(spans)
        by_replica.setdefault(replica, []).append(llm)
    request = ExportTraceServiceRequest()
    gateway_resource = {"service.name": sc.GATEWAY_SERVICE, "service.version": "0.1.0", **SDK}
    groups = [(gateway_resource, GATEWAY_SCOPE, gateway)]
    groups += [({"service.name": f"{sc.VLLM_SERVICE_PREFIX}{replica}", **SDK}, VLLM_SCOPE, spans)
               for replica, spans in sorted(by_replica.items())]
    for resource, scope, spans in groups:
        rs = request.resource_spans.add(resource=Resource(attributes=[kv(k, v) for k, v in resource.items()]))
        rs.scope_spans.add(scope=scope, spans=spans)
    return request


def marker_message(span_id: bytes) -> bytes:
    """A one-span request. Appended to a serialized request it becomes one more ResourceSpans of
    that request (protobuf merges concatenated messages), so a marker rides in a real batch."""
    now = time.time_ns()
    span = Span(trace_id=os.urandom(16), span_id=span_id, name=MARKER_SPAN, kind=Span.SPAN_KIND_INTERNAL,
                start_time_unix_nano=now, end_time_unix_nano=now + 1000,
                attributes=[kv("bench.sent_unix_ns", now)])
    resource = Resource(attributes=[kv("service.name", MARKER_SERVICE)])
    group = ResourceSpans(resource=resource, scope_spans=[ScopeSpans(spans=[span])])
    return ExportTraceServiceRequest(resource_spans=[group]).SerializeToString()


# ====================================================================== processes
@dataclass
class Child:
    """A child process in its own session (process group), stopped with its whole group."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.process.poll() is not None:
            return self.process.returncode
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()
        except ProcessLookupError:
            return self.process.wait()


def spawn(name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> Child:
    with open(log_path, "ab") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
    return Child(name, process, log_path)


def start_warehouse(workdir: Path, children: list[Child]) -> tuple[Child, int]:
    port = free_port()
    child = spawn("warehouse", [sys.executable, "-m", "fleetlens", "warehouse", "serve", "--path",
                                str(workdir / "warehouse"), "--port", str(port), "--log-level", "warning"],
                  workdir / "warehouse.log")
    children.append(child)
    try:
        wait_until_ready(WarehouseURL.parse(f"http://127.0.0.1:{port}"), 60, alive=child.alive)
    except WarehouseUnavailable as error:
        raise RuntimeError(f"{error}: {child.log_tail()}") from None
    from fleetlens.schema import RenderOptions, migrate

    admin = clickhouse_connect.get_client(host="127.0.0.1", port=port)
    migrate(admin, RenderOptions(database=DATABASE))
    admin.close()
    return child, port


def start_collector(workdir: Path, warehouse_port: int, workers: int, extra_env: dict[str, str],
                    children: list[Child]) -> tuple[Child, int, int]:
    grpc_port, http_port = free_port(), free_port()
    env = {"FLEETLENS_WAREHOUSE_URL": f"http://default@127.0.0.1:{warehouse_port}/{DATABASE}",
           "FLEETLENS_DATA_DIR": str(workdir / "collector"), **extra_env}
    argv = [sys.executable, "-m", "fleetlens", "collector", "--otlp-grpc-port", str(grpc_port),
            "--otlp-http-port", str(http_port), "--workers", str(workers), "--log-level", "warning"]
    child = spawn("collector", argv, workdir / "collector.log", env)
    children.append(child)
    wait_http(child, http_port, "/health", 60)
    return child, grpc_port, http_port


def wait_http(child: Child, port: int, path: str, timeout_s: float) -> None:
    if net.wait_http(f"http://127.0.0.1:{port}{path}", timeout_s, alive=child.alive, interval_s=0.2):
        return
    if not child.alive():
        raise RuntimeError(f"{child.name} exited: {child.log_tail()}")
    raise RuntimeError(f"{child.name} did not answer {path} within {timeout_s:.0f} s: {child.log_tail()}")


def http_get(port: int, path: str, timeout_s: float = 5) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def tree(pid: int) -> list[psutil.Process]:
    """A process and its descendants (empty once it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def is_writer(process: psutil.Process) -> bool:
    """The collector's writer processes are multiprocessing 'spawn' children."""
    try:
        return "spawn_main" in " ".join(process.cmdline())
    except psutil.Error:
        return False


def fleetlens_groups(collector: Child, warehouse: Child) -> dict[str, list[psutil.Process]]:
    """FleetLens's processes by role; everything under the collector that is not a writer (the
    multiprocessing resource tracker) counts as its main."""
    collector_tree = tree(collector.process.pid)
    return {"collector main": [p for p in collector_tree if not is_writer(p)],
            "writers": [p for p in collector_tree if is_writer(p)],
            "warehouse": tree(warehouse.process.pid)}


# ========================================================================= sinks
class Sink(Protocol):
    """Where spans become queryable: counts them and finds marker spans."""

    name: str

    def count(self) -> int: ...

    def arrived(self, span_ids: list[str]) -> set[str]: ...


class ClickHouseSink:
    """`otel_traces` in the embedded warehouse. One client per thread (a clickhouse-connect client
    is not for concurrent use), sessionless so each query is a fresh, cheap chDB connection."""

    name = "FleetLens"

    def __init__(self, port: int) -> None:
        self.port = port
        self._local = threading.local()

    def _client(self) -> Any:
        if getattr(self._local, "client", None) is None:
            self._local.client = clickhouse_connect.get_client(
                host="127.0.0.1", port=self.port, database=DATABASE, autogenerate_session_id=False,
                compress=False)
        return self._local.client

    def count(self) -> int:
        return int(self._client().command("SELECT count() FROM otel_traces"))

    def arrived(self, span_ids: list[str]) -> set[str]:
        ids = ",".join(f"'{s}'" for s in span_ids)
        query = (f"SELECT SpanId FROM otel_traces WHERE ServiceName = '{MARKER_SERVICE}' "
                 f"AND SpanName = '{MARKER_SPAN}' AND SpanId IN ({ids})")
        return {row[0] for row in self._client().query(query).result_rows}


class PhoenixSink:
    """Phoenix's SQLite database (`spans`, span_id in hex), read-only from this process."""

    name = "Phoenix"

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path
        self._local = threading.local()

    def _rows(self, sql: str, params: list[str] | None = None) -> list[tuple[Any, ...]]:
        if getattr(self._local, "conn", None) is None:
            if not self.db_path.exists():
                return []
            self._local.conn = sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=5)
        try:
            return self._local.conn.execute(sql, params or []).fetchall()
        except sqlite3.OperationalError:  # not migrated yet, or locked by Phoenix's writer
            return []

    def count(self) -> int:
        rows = self._rows("SELECT count(*) FROM spans")
        return int(rows[0][0]) if rows else 0

    def arrived(self, span_ids: list[str]) -> set[str]:
        marks = ",".join("?" * len(span_ids))
        rows = self._rows(f"SELECT span_id FROM spans WHERE span_id IN ({marks})", span_ids)
        return {row[0] for row in rows}


# ======================================================================= senders
@dataclass
class SendStats:
    """One protocol's outcomes, bumped by its sender threads under `lock`."""

    acked_spans: int = 0
    refused: Counter[str] = field(default_factory=Counter)  # "429", "503", "RESOURCE_EXHAUSTED", ...
    errors: Counter[str] = field(default_factory=Counter)
    acks: list[tuple[float, float]] = field(default_factory=list)  # (monotonic time, round trip s)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def acked(self) -> int:
        with self.lock:
            return self.acked_spans


@dataclass
class Marker:
    span_id: str
    protocol: str
    sent: float  # monotonic, start of the attempt that was acknowledged
    arrived: float | None = None


class Markers:
    """Hands out a marker every `interval` s; records when each is sent and seen."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.items: dict[str, Marker] = {}
        self._next = 0.0
        self._lock = threading.Lock()

    def take(self, now: float) -> bytes | None:
        with self._lock:
            if now < self._next:
                return None
            self._next = now + self.interval
        return os.urandom(8)

    def sent(self, span_id: bytes, protocol: str, at: float) -> None:
        with self._lock:
            self.items[span_id.hex()] = Marker(span_id.hex(), protocol, at)

    def pending(self) -> list[Marker]:
        with self._lock:
            return [m for m in self.items.values() if m.arrived is None]


class Pacer:
    """Spaces requests so that all senders together offer `rate` spans/s (None: no pacing). One
    that falls behind catches up at most a second's worth, so no burst follows a stall."""

    def __init__(self, rate: float | None, spans_per_request: int) -> None:
        self.interval = spans_per_request / rate if rate else 0.0
        self._next = time.monotonic()
        self._lock = threading.Lock()

    def wait(self, stop: threading.Event) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now - 1.0)
            slot, self._next = self._next, self._next + self.interval
        if slot > now:
            stop.wait(slot - now)


class Refused(Exception):
    """A retryable answer (429/503, RESOURCE_EXHAUSTED/UNAVAILABLE) and how long to wait."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.reason, self.retry_after_s = reason, retry_after_s


class HttpTransport:
    """OTLP/HTTP protobuf over one keep-alive connection (http.client: little CPU a request)."""

    protocol = "http"

    def __init__(self, port: int) -> None:
        self.port = port
        self._conn: http.client.HTTPConnection | None = None

    def send(self, body: bytes) -> None:
        reused = self._conn is not None
        try:
            response = self._post(body)
        except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
            if not reused:
                raise
            response = self._post(body)  # the server closed an idle keep-alive connection: reconnect
        if response.status in (429, 503):
            raise Refused(str(response.status), float(response.getheader("Retry-After") or 1))
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")

    def _post(self, body: bytes) -> http.client.HTTPResponse:
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            headers = {"Content-Type": "application/x-protobuf"}
            self._conn.request("POST", "/v1/traces", body=body, headers=headers)
            response = self._conn.getresponse()
            response.read()
            return response
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class GrpcTransport:
    """OTLP/gRPC sending the encoded bytes as they are (no serializer); one channel, so one HTTP/2
    connection, per sender thread."""

    protocol = "grpc"

    def __init__(self, port: int) -> None:
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.max_send_message_length", 64 * 1024**2), ("grpc.use_local_subchannel_pool", 1)])
        self._export = self._channel.unary_unary(EXPORT_METHOD)

    def send(self, body: bytes) -> None:
        try:
            self._export(body, timeout=120)
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            if code in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
                raise Refused(code.name, _retry_delay(error)) from None
            raise RuntimeError(f"gRPC {code.name}: {error.details()}") from None  # type: ignore[attr-defined]

    def close(self) -> None:
        self._channel.close()


def _retry_delay(error: grpc.RpcError) -> float:
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "google.rpc.retryinfo-bin":
            delay = error_details_pb2.RetryInfo.FromString(value).retry_delay
            return delay.seconds + delay.nanos / 1e9
    return 1.0


def sender_loop(transport: HttpTransport | GrpcTransport, payloads: list[Payload], first: int, pacer: Pacer,
                markers: Markers, stats: SendStats, stop: threading.Event) -> None:
    """Send payloads round-robin until `stop`; a refused request waits as told and goes again."""
    try:
        for index in itertools.count(first):
            pacer.wait(stop)
            if stop.is_set():
                return
            payload = payloads[index % len(payloads)]
            marker = markers.take(time.monotonic())
            body = payload.body + marker_message(marker) if marker else payload.body
            while not stop.is_set():
                started = time.monotonic()
                try:
                    transport.send(body)
                except Refused as refusal:
                    with stats.lock:
                        stats.refused[refusal.reason] += 1
                    stop.wait(max(0.05, refusal.retry_after_s))
                    continue
                except Exception as error:  # noqa: BLE001 - counted; the same request again
                    with stats.lock:
                        stats.errors[str(error)[:120]] += 1
                    stop.wait(0.5)
                    continue
                done = time.monotonic()
                if marker:
                    markers.sent(marker, transport.protocol, started)
                with stats.lock:
                    stats.acked_spans += payload.spans + (1 if marker else 0)
                    stats.acks.append((done, done - started))
                break
    finally:
        transport.close()


def start_senders(ports: dict[str, int], connections: int, payloads: list[Payload], pacer: Pacer,
                  markers: Markers, stop: threading.Event
                  ) -> tuple[list[threading.Thread], dict[str, SendStats]]:
    """`connections` sender threads per protocol in `ports`, each starting at its own payload."""
    threads, stats = [], {}
    for protocol, port in ports.items():
        stats[protocol] = SendStats()
        for k in range(connections):
            transport = HttpTransport(port) if protocol == "http" else GrpcTransport(port)
            first = k * len(payloads) // connections
            args = (transport, payloads, first, pacer, markers, stats[protocol], stop)
            thread = threading.Thread(target=sender_loop, args=args, name=f"send-{protocol}-{k}", daemon=True)
            thread.start()
            threads.append(thread)
    return threads, stats


# =================================================================== observation
class MarkerPoller(threading.Thread):
    """Looks for pending markers; a marker arrived at the start of the first query that saw it.
    Queries are `interval` apart, stretched to a tenth of the oldest pending marker's age (≤ 2 s):
    the error stays under ~10 % of the delay without flooding a backlogged warehouse with polls."""

    def __init__(self, sink: Sink, markers: Markers, interval: float) -> None:
        super().__init__(name="marker-poller", daemon=True)
        self.sink, self.markers, self.interval = sink, markers, interval
        self.queries, self.query_seconds, self.errors = 0, 0.0, 0
        self._halt = threading.Event()

    def run(self) -> None:
        wait = self.interval
        while not self._halt.wait(wait):
            pending = self.markers.pending()
            wait = self.interval
            if not pending:
                continue
            started = time.monotonic()
            wait = min(2.0, max(self.interval, 0.1 * (started - min(m.sent for m in pending))))
            try:
                seen = self.sink.arrived([m.span_id for m in pending])
            except Exception:  # noqa: BLE001 - a busy warehouse: next round
                self.errors += 1
                continue
            self.queries += 1
            self.query_seconds += time.monotonic() - started
            for marker in pending:
                if marker.span_id in seen:
                    marker.arrived = started

    def stop(self) -> None:
        """Stop polling, after one last look: a marker in the very last batch may have landed
        after the previous poll (its delay is then measured up to now: an overestimate)."""
        self._halt.set()
        self.join(10)
        pending = self.markers.pending()
        if pending:
            seen = self.sink.arrived([m.span_id for m in pending])
            now = time.monotonic()
            for marker in pending:
                if marker.span_id in seen:
                    marker.arrived = now


def scrape_collector(port: int) -> dict[str, float]:
    """The collector's /metrics, summed over labels, without the `fleetlens_collector_` prefix."""
    try:
        status, body = http_get(port, "/metrics")
    except OSError:
        return {}
    out: Counter[str] = Counter()
    if status == 200:
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                out[sample.name.removeprefix("fleetlens_collector_")] += sample.value
    return dict(out)


@dataclass
class Sample:
    t: float  # monotonic
    queryable: int
    acked: dict[str, int]  # by protocol
    metrics: dict[str, float]

    @property
    def total_acked(self) -> int:
        return sum(self.acked.values())


class CpuMeter:
    """CPU seconds by process role between start() and stop(), the collector main's by thread,
    and 'other processes': the rest of the machine's busy time."""

    def __init__(self, groups: Callable[[], dict[str, list[psutil.Process]]]) -> None:
        self.groups = groups
        self._start: tuple[dict[str, float], dict[int, float]] = ({}, {})
        self._machine = self._t = 0.0

    def start(self) -> None:
        self._start, self._machine, self._t = self._read(), _machine_busy(), time.monotonic()

    def stop(self) -> dict[str, Any]:
        (by_role, by_thread), (role0, thread0) = self._read(), self._start
        elapsed = time.monotonic() - self._t
        used = {role: max(0.0, seconds - role0.get(role, 0.0)) for role, seconds in by_role.items()}
        used["other processes"] = max(0.0, _machine_busy() - self._machine - sum(used.values()))
        threads = {tid: d for tid, s in by_thread.items() if (d := s - thread0.get(tid, 0.0)) > 0.005}
        main = self.groups().get("collector main", [])
        return {"elapsed_s": elapsed, "capacity_cpu_s": elapsed * (psutil.cpu_count() or 1), "cpu_s": used,
                "collector_main_pid": main[0].pid if main else None, "collector_main_threads_cpu_s": threads}

    def _read(self) -> tuple[dict[str, float], dict[int, float]]:
        roles: dict[str, float] = {}
        threads: dict[int, float] = {}
        for role, processes in self.groups().items():
            roles[role] = 0.0
            for process in processes:
                try:
                    times = process.cpu_times()
                    roles[role] += times.user + times.system
                    if role == "collector main" and process is processes[0]:
                        threads |= {t.id: t.user_time + t.system_time for t in process.threads()}
                except psutil.Error:
                    continue
        return roles, threads


def _machine_busy() -> float:
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0) + getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
    return sum(t) - idle


# ====================================================================== profiling
class Profiler:
    """One `py-spy record --nonblocking --format raw` per process (nonblocking: the target is not
    paused per sample, so profiling perturbs less). The collector main is sampled with --threads
    --gil: only the thread holding the GIL, i.e. where its Python CPU goes, by thread (event loop,
    spool flush, dispatcher). Writers and warehouse by active thread (chDB runs without the GIL)."""

    def __init__(self, out_dir: Path, seconds: int, rate: int) -> None:
        self.out_dir, self.seconds, self.rate = out_dir, seconds, rate
        self.binary = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
        self.runs: list[tuple[str, int, Path, subprocess.Popen[bytes]]] = []

    def start(self, targets: dict[str, list[int]]) -> None:
        if self.binary is None:
            console.print("[yellow]py-spy not found (pip install py-spy into .venv); no profile[/yellow]")
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for role, pids in targets.items():
            for pid in pids:
                raw = self.out_dir / f"{role.replace(' ', '_')}-{pid}.txt"
                argv = [self.binary, "record", "--nonblocking", "--nolineno", "--format", "raw",
                        "--rate", str(self.rate), "--duration", str(self.seconds), "--pid", str(pid),
                        "--output", str(raw)]
                if role == "collector main":
                    argv += ["--threads", "--gil"]
                with open(raw.with_suffix(".log"), "wb") as log:
                    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True)
                self.runs.append((role, pid, raw, process))

    def pids(self) -> list[int]:
        return [process.pid for *_, process in self.runs if process.poll() is None]

    def finish(self) -> dict[str, StackProfile]:
        profiles: dict[str, StackProfile] = {}
        for role, pid, raw, process in self.runs:
            try:
                process.wait(timeout=self.seconds + 60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGINT)
                process.wait(30)
            if not raw.exists():
                log = raw.with_suffix(".log").read_text(errors="replace")[-400:]
                console.print(f"[yellow]py-spy recorded nothing for {role} (pid {pid}): {log}[/yellow]")
                continue
            kind = "GIL-holding" if role == "collector main" else "active"
            profiles.setdefault(role, StackProfile(kind=kind)).add_file(raw)
        return profiles

    def stop(self) -> None:
        for *_, process in self.runs:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@dataclass
class StackProfile:
    """Collapsed stacks summed: self and inclusive samples by function, samples by thread."""

    kind: str = "active"  # which samples: of "active" threads, or of the "GIL-holding" one
    samples: int = 0
    self_counts: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)
    threads: Counter[str] = field(default_factory=Counter)
    thread_names: dict[int, str] = field(default_factory=dict)  # native id → Python name (--threads)

    def add_file(self, path: Path) -> None:
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n, frames = int(count), stack.split(";")
            if frames[0].startswith("thread ("):  # "thread (12345): writer-dispatch"
                label, _, name = frames.pop(0).partition(": ")
                self.threads[name] += n
                tid = label.removeprefix("thread (").rstrip(")")
                if tid.isdigit():
                    self.thread_names[int(tid)] = name
            if not frames:
                continue
            self.samples += n
            self.self_counts[frames[-1]] += n
            for frame in set(frames):
                self.inclusive[frame] += n

    def top(self, n: int) -> list[tuple[str, float, float]]:
        """(function, self share, inclusive share), by self samples."""
        return [(frame, count / self.samples, self.inclusive[frame] / self.samples)
                for frame, count in self.self_counts.most_common(n)]


# Frames whose self samples are mostly waiting rather than CPU: py-spy counts a thread active unless
# the OS shows it asleep, so a thread in fdatasync (D state), or runnable but not scheduled on a busy
# machine, counts though it burns no CPU. The psutil CPU table is the CPU truth.
WAIT_HINTS = {
    "select (selectors.py)": "epoll wait",
    "Runner.run (asyncio/runners.py)": "event loop (uvloop: C, incl. epoll)",
    "Condition.wait": "lock/condition wait",
    "Event.wait": "event wait",
    "_recv (multiprocessing": "pipe wait",
    "Spool._flush_chunks": "writev + fdatasync",
    "Writer._step": "incl. time.sleep(0.005) polling",
}


def waiting_note(frame: str) -> str:
    return next((note for hint, note in WAIT_HINTS.items() if hint in frame), "")


# ===================================================================== measuring
@dataclass
class PushConfig:
    protocols: list[str]
    duration: float
    warmup: float
    rate: float | None
    connections: int
    spans_per_request: int
    marker_interval: float
    poll_interval: float
    drain_timeout: float


@dataclass
class PushResult:
    target: str
    window_s: float
    acked_spans: int
    written_spans: int
    acked_per_s: float
    written_per_s: float
    acked_per_s_by_protocol: dict[str, float]
    refused_requests: dict[str, dict[str, int]]
    send_errors: dict[str, dict[str, int]]
    ack_latency_s: dict[str, dict[str, float]]
    backlog_spans_start: int
    backlog_spans_end: int
    backlog_slope_spans_per_s: float
    spool_bytes_start: float | None
    spool_bytes_end: float | None
    spool_bytes_max: float | None
    sustained: bool
    drain_s: float | None
    delay_s: dict[str, dict[str, float]]
    markers_sent: int
    markers_lost: int
    poll_note: str
    cpu: dict[str, Any]
    cpu_us_per_span: dict[str, float]
    projected_spans_per_s: float | None
    series: list[dict[str, float]]


def push(target: str, sink: Sink, ports: dict[str, int], payloads: list[Payload], config: PushConfig,
         cpu: CpuMeter, metrics_port: int | None = None, on_window_start: Callable[[], None] | None = None
         ) -> PushResult:
    """Send for warm-up + duration, sampling every second, then drain; numbers are over the window."""
    markers, stop = Markers(config.marker_interval), threading.Event()
    poller = MarkerPoller(sink, markers, config.poll_interval)
    baseline = sink.count()
    threads, stats = start_senders({p: ports[p] for p in config.protocols}, config.connections, payloads,
                                   Pacer(config.rate, config.spans_per_request), markers, stop)
    poller.start()
    samples: list[Sample] = []

    def sample(exact: bool = False) -> Sample:
        """Between the window's ends the collector's written counter stands in for count(): rows
        are queryable once their insert returns, and it spares the warehouse a query a second."""
        acked = {p: s.acked() for p, s in stats.items()}
        metrics = scrape_collector(metrics_port) if metrics_port else {}
        written = metrics.get("written_spans")
        queryable = sink.count() - baseline if exact or written is None else int(written)
        samples.append(Sample(time.monotonic(), queryable, acked, metrics))
        return samples[-1]

    try:
        time.sleep(config.warmup)
        first = sample(exact=True)
        cpu.start()
        if on_window_start:
            on_window_start()
        with console.status(f"{target}: measuring") as status:
            while (left := first.t + config.duration - time.monotonic()) > 0:
                time.sleep(min(1.0, left))
                s = sample(exact=left <= 1.0)
                elapsed = s.t - first.t
                status.update(f"{target}: {elapsed:3.0f}/{config.duration:.0f} s, acked "
                              f"{(s.total_acked - first.total_acked) / elapsed:,.0f}/s, queryable "
                              f"{(s.queryable - first.queryable) / elapsed:,.0f}/s")
        cpu_used = cpu.stop()
    finally:
        stop.set()
        for thread in threads:
            thread.join(150)
    last = samples[-1]
    drain_s = drain(sink, baseline, sum(s.acked() for s in stats.values()), last.t, config.drain_timeout)
    poller.stop()
    return summarize(target, samples, first, last, stats, markers, poller, drain_s, cpu_used)


def drain(sink: Sink, baseline: int, acked: int, window_end: float, timeout_s: float) -> float | None:
    """Seconds from the window's end until every acked span was queryable (None: not in time)."""
    deadline = time.monotonic() + timeout_s
    with console.status("draining") as status:
        while time.monotonic() < deadline:
            try:
                left = acked - (sink.count() - baseline)
            except Exception:  # noqa: BLE001 - a busy warehouse: ask again
                left = -1
            if left == 0 or left < -1:  # (more rows than acks: a replayed batch)
                return time.monotonic() - window_end
            status.update(f"draining: {left:,} spans not yet queryable")
            time.sleep(1.0)
    return None


def summarize(target: str, samples: list[Sample], first: Sample, last: Sample, stats: dict[str, SendStats],
              markers: Markers, poller: MarkerPoller, drain_s: float | None, cpu_used: dict[str, Any]
              ) -> PushResult:
    window = last.t - first.t
    acked, written = last.total_acked - first.total_acked, last.queryable - first.queryable
    in_window = [s for s in samples if first.t <= s.t <= last.t]
    second_half = [s for s in in_window if s.t >= first.t + window / 2]
    slope = (_slope([s.t for s in second_half], [s.total_acked - s.queryable for s in second_half])
             if len(second_half) >= 3 else 0.0)
    spool = [s.metrics["spool_bytes"] for s in in_window if "spool_bytes" in s.metrics]
    sent = [m for m in markers.items.values() if first.t <= m.sent <= last.t]
    groups = [("all", sent)]
    if len(stats) > 1:
        groups += [(p, [m for m in sent if m.protocol == p]) for p in stats]
    delays = {label: _percentiles(seen) | {"n": float(len(seen))} for label, group in groups
              if (seen := [m.arrived - m.sent for m in group if m.arrived is not None])}
    acks = {p: [rtt for when, rtt in s.acks if first.t <= when <= last.t] for p, s in stats.items()}
    per_span = cpu_per_span(cpu_used["cpu_s"], acked, written)
    return PushResult(
        target=target, window_s=window, acked_spans=acked, written_spans=written, acked_per_s=acked / window,
        written_per_s=written / window,
        acked_per_s_by_protocol={p: (last.acked[p] - first.acked[p]) / window for p in stats},
        refused_requests={p: dict(s.refused) for p, s in stats.items()},
        send_errors={p: dict(s.errors) for p, s in stats.items() if s.errors},
        ack_latency_s={p: _percentiles(rtts) for p, rtts in acks.items() if rtts},
        backlog_spans_start=first.total_acked - first.queryable,
        backlog_spans_end=last.total_acked - last.queryable,
        backlog_slope_spans_per_s=slope,
        spool_bytes_start=spool[0] if spool else None, spool_bytes_end=spool[-1] if spool else None,
        spool_bytes_max=max(spool) if spool else None,
        sustained=(written >= SUSTAINED_WRITTEN_SHARE * acked
                   and (slope < SUSTAINED_SLOPE_SHARE * acked / window
                        or last.total_acked - last.queryable <= 2 * acked / window)),
        drain_s=drain_s, delay_s=delays, markers_sent=len(sent),
        markers_lost=sum(1 for m in sent if m.arrived is None),
        poll_note=f"{poller.queries} marker queries ({poller.query_seconds:.1f} s of round trips), "
                  f"{poller.errors} failed",
        cpu=cpu_used, cpu_us_per_span=per_span, projected_spans_per_s=_projection(per_span),
        series=[{"t": round(s.t - first.t, 2), "acked": s.total_acked - first.total_acked,
                 "queryable": s.queryable - first.queryable,
                 "spool_bytes": s.metrics.get("spool_bytes", -1.0)} for s in samples],
    )


# A process's CPU is divided by the spans it handles: acked ones on the receiving side, written ones
# on the writing side. The sender, py-spy and other people's processes are not pipeline cost.
PER_ACKED = ("collector main", BENCH)
PIPELINE = ("collector main", "writers", "warehouse", "phoenix")


def cpu_per_span(cpu_s: dict[str, float], acked: int, written: int) -> dict[str, float]:
    """CPU µs a span by process: unlike spans/s, it barely depends on what else the machine runs."""
    out = {}
    for role, seconds in cpu_s.items():
        spans = acked if role in PER_ACKED else written
        if role not in ("py-spy", "other processes") and spans:
            out[role] = seconds / spans * 1e6
    return out


def _projection(per_span: dict[str, float]) -> float | None:
    """spans/s that the pipeline's CPU cost allows on all cores of this machine with nothing else
    running (sender excluded): an upper bound derived from µs/span, not a measurement."""
    total = sum(v for role, v in per_span.items() if role in PIPELINE)
    return (psutil.cpu_count() or 1) * 1e6 / total if total else None


def _slope(xs: list[float], ys: list[int]) -> float:
    return float(np.polyfit(np.array(xs) - xs[0], np.array(ys, dtype=float), 1)[0])


def _percentiles(values: list[float]) -> dict[str, float]:
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "max": float(max(values))}


# ===================================================================== the runs
def push_config(args: argparse.Namespace, duration: float, rate: str) -> PushConfig:
    return PushConfig(protocols=["http", "grpc"] if args.protocol == "both" else [args.protocol],
                      duration=duration, warmup=args.warmup, rate=None if rate == "max" else float(rate),
                      connections=args.connections, spans_per_request=args.spans_per_request,
                      marker_interval=args.marker_interval, poll_interval=args.poll_interval,
                      drain_timeout=args.drain_timeout)


def run_fleetlens(args: argparse.Namespace, payloads: list[Payload], workdir: Path, children: list[Child]
                  ) -> tuple[PushResult, dict[str, StackProfile], dict[str, float]]:
    warehouse, wh_port = start_warehouse(workdir, children)
    extra_env = dict(item.split("=", 1) for item in args.collector_env)
    collector, grpc_port, http_port = start_collector(workdir, wh_port, args.workers, extra_env, children)
    console.print(f"warehouse pid {warehouse.process.pid} (port {wh_port}); collector pid "
                  f"{collector.process.pid} (gRPC {grpc_port}, HTTP {http_port}, {args.workers} writers); "
                  f"work dir {workdir}")
    profiler = None
    if args.profile:
        out_dir = Path(args.profile_dir) / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.protocol}"
        profiler = Profiler(out_dir, args.profile_seconds or int(args.duration), args.profile_rate)

    def groups() -> dict[str, list[psutil.Process]]:
        found = fleetlens_groups(collector, warehouse) | {BENCH: [psutil.Process()]}
        if profiler:
            found["py-spy"] = [p for pid in profiler.pids() for p in tree(pid)]
        return found

    def start_profiler() -> None:
        if profiler:
            found = fleetlens_groups(collector, warehouse)
            roles = {role: [p.pid for p in processes] for role, processes in found.items()}
            roles["collector main"] = [collector.process.pid]  # not the idle resource tracker
            profiler.start(roles)

    try:
        result = push("FleetLens", ClickHouseSink(wh_port), {"http": http_port, "grpc": grpc_port}, payloads,
                      push_config(args, args.duration, args.rate), CpuMeter(groups), metrics_port=http_port,
                      on_window_start=start_profiler)
        profiles = profiler.finish() if profiler else {}
    finally:
        if profiler:
            profiler.stop()
    if not collector.alive():
        raise RuntimeError(f"the collector died: {collector.log_tail()}")
    return result, profiles, scrape_collector(http_port)


def run_phoenix(args: argparse.Namespace, payloads: list[Payload], workdir: Path, children: list[Child]
                ) -> PushResult | str:
    """Phoenix's OTLP ingestion of the same payloads, or why it could not be measured."""
    phoenix_bin = PHOENIX_VENV / "bin" / "phoenix"
    if not phoenix_bin.exists():
        return f"{phoenix_bin} not found (pip install arize-phoenix into the separate {PHOENIX_VENV.name})"
    http_port, grpc_port, home = free_port(), free_port(), workdir / "phoenix"
    home.mkdir()
    env = {"PHOENIX_PORT": str(http_port), "PHOENIX_GRPC_PORT": str(grpc_port), "PHOENIX_HOST": "127.0.0.1",
           "PHOENIX_WORKING_DIR": str(home), "PHOENIX_TELEMETRY_ENABLED": "false",
           "PHOENIX_ALLOW_EXTERNAL_RESOURCES": "false", "DO_NOT_TRACK": "1"}
    child = spawn("phoenix", [str(phoenix_bin), "serve"], workdir / "phoenix.log", env)
    children.append(child)
    try:
        wait_http(child, http_port, "/healthz", 180)
    except RuntimeError as error:
        return f"phoenix serve did not come up: {error}"
    console.print(f"phoenix pid {child.process.pid} (OTLP/HTTP {http_port}, gRPC {grpc_port}); "
                  f"working dir {home}")
    config = push_config(args, args.phoenix_duration, args.phoenix_rate)
    config.drain_timeout = min(config.drain_timeout, 30)
    groups = lambda: {"phoenix": tree(child.process.pid), BENCH: [psutil.Process()]}  # noqa: E731
    try:
        return push("Phoenix", PhoenixSink(home / "phoenix.db"), {"http": http_port, "grpc": grpc_port},
                    payloads, config, CpuMeter(groups))
    finally:
        child.stop()


# ======================================================================= report
def report(result: PushResult, profiles: dict[str, StackProfile], final_metrics: dict[str, float],
           phoenix: PushResult | str | None, args: argparse.Namespace, origin: str) -> dict[str, Any]:
    rate = "max (as fast as acked)" if args.rate == "max" else f"{float(args.rate):,.0f} spans/s offered"
    console.print(f"[bold]FleetLens[/bold] {args.protocol}, {rate}, {args.connections} connection(s) per "
                  f"protocol, ~{args.spans_per_request} spans/request from the {origin}, "
                  f"{args.workers} writers; "
                  f"{result.window_s:.1f} s window after {args.warmup:.0f} s warm-up; "
                  f"load average now {os.getloadavg()[0]:.1f} on {psutil.cpu_count()} cores")
    measured = [result] + ([phoenix] if isinstance(phoenix, PushResult) else [])
    print_throughput(measured)
    print_delay(measured)
    print_cpu(result, profiles["collector main"].thread_names if "collector main" in profiles else {})
    for role, profile in profiles.items():
        print_profile(role, profile)
    ratios = phoenix_ratios(result, phoenix)
    if isinstance(phoenix, PushResult):
        print_cpu(phoenix, {})
        text = ", ".join(f"{k} {v:,.0f}×" for k, v in ratios.items())
        console.print(f"FleetLens ÷ Phoenix: {text or 'no ratio (nothing queryable in Phoenix)'}")
    elif isinstance(phoenix, str):
        console.print(f"Phoenix not measured: {phoenix}")
    met = result.sustained and result.written_per_s >= BAR_SPANS_PER_S
    console.print(f"bar ≥ {BAR_SPANS_PER_S:,} spans/s sustained: {'MET' if met else 'NOT MET'} "
                  f"(written {result.written_per_s:,.0f}/s, "
                  f"sustained {'yes' if result.sustained else 'no'}); "
                  f"goal ≥ {GOAL_SPANS_PER_S:,}; reference: {REFERENCE}")
    return {
        "config": vars(args), "payload_source": origin, "fleetlens": asdict(result),
        "collector_metrics_final": final_metrics,
        "profiles": {role: {"kind": p.kind, "samples": p.samples, "top_self": p.top(30),
                            "threads": dict(p.threads)} for role, p in profiles.items()},
        "phoenix": asdict(phoenix) if isinstance(phoenix, PushResult) else phoenix,
        "fleetlens_over_phoenix": ratios,
        "machine": {"cpus": psutil.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
    }


def phoenix_ratios(result: PushResult, phoenix: PushResult | str | None) -> dict[str, float]:
    if not isinstance(phoenix, PushResult):
        return {}
    pairs = {"acked spans/s": (result.acked_per_s, phoenix.acked_per_s),
             "queryable spans/s": (result.written_per_s, phoenix.written_per_s)}
    return {name: ours / theirs for name, (ours, theirs) in pairs.items() if theirs}


def print_throughput(results: list[PushResult]) -> None:
    table = Table(title="Throughput over the window")
    for column in ("target", "acked spans/s", "by protocol", "written (queryable) spans/s", "sustained",
                   "backlog spans start→end", "backlog slope /s", "spool start→end (max)", "refused",
                   "errors", "drain s"):
        table.add_column(column, justify="left" if column in ("target", "by protocol") else "right")
    for r in results:
        spool = "-" if r.spool_bytes_end is None else \
            f"{_mb(r.spool_bytes_start)}→{_mb(r.spool_bytes_end)} ({_mb(r.spool_bytes_max)})"
        table.add_row(r.target, f"{r.acked_per_s:,.0f}",
                      "\n".join(f"{p} {v:,.0f}" for p, v in r.acked_per_s_by_protocol.items()),
                      f"{r.written_per_s:,.0f}", "yes" if r.sustained else "NO",
                      f"{r.backlog_spans_start:,}→{r.backlog_spans_end:,}",
                      f"{r.backlog_slope_spans_per_s:,.0f}",
                      spool, f"{sum(sum(v.values()) for v in r.refused_requests.values()):,}",
                      f"{sum(sum(v.values()) for v in r.send_errors.values()):,}",
                      "timeout" if r.drain_s is None else f"{r.drain_s:.1f}")
    console.print(table)


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e6:,.0f} MB"


def print_delay(results: list[PushResult]) -> None:
    table = Table(title="Ingest delay send → queryable (marker spans) and ack round trip, seconds")
    for column in ("target", "markers seen/sent", "p50", "p95", "p99", "max", "ack p50", "ack p99"):
        table.add_column(column, justify="left" if column == "target" else "right")
    for r in results:
        rows = list(r.delay_s.items()) or [("all", None)]
        for label, d in rows:
            ack = r.ack_latency_s.get(label) or (next(iter(r.ack_latency_s.values()))
                                                 if len(r.ack_latency_s) == 1 else None)
            cells = [f"{d[k]:.2f}" for k in ("p50", "p95", "p99", "max")] if d else ["-"] * 4
            seen = f"{int(d['n']) if d else 0}" + (f"/{r.markers_sent}" if label == "all" else "")
            table.add_row(f"{r.target} {label}", seen, *cells, *([f"{ack['p50']:.3f}", f"{ack['p99']:.3f}"]
                                                                 if ack else ["-", "-"]))
    console.print(table)
    for r in results:
        console.print(f"  {r.target}: {r.poll_note}; delays exact to the poll interval")


def print_cpu(result: PushResult, thread_names: dict[int, str]) -> None:
    cpu = result.cpu
    table = Table(title=f"{result.target}: CPU by process over {cpu['elapsed_s']:.1f} s "
                        f"({cpu['capacity_cpu_s']:.0f} CPU-s on {psutil.cpu_count()} cores)")
    for column in ("process", "CPU s", "cores", "share of machine", "µs per span"):
        table.add_column(column, justify="left" if column == "process" else "right")

    def row(label: str, seconds: float, per_span: float | None, unit: str) -> None:
        table.add_row(label, f"{seconds:.1f}", f"{seconds / cpu['elapsed_s']:.2f}",
                      f"{seconds / cpu['capacity_cpu_s']:.0%}",
                      f"{per_span:.1f} ({unit})" if per_span else "-")

    for role, seconds in cpu["cpu_s"].items():
        row(role, seconds, result.cpu_us_per_span.get(role), "acked" if role in PER_ACKED else "written")
    threads = sorted(cpu.get("collector_main_threads_cpu_s", {}).items(), key=lambda kv: -kv[1])
    for tid, seconds in threads[:6]:
        name = thread_names.get(tid) or ("MainThread" if tid == cpu["collector_main_pid"] else f"tid {tid}")
        per_span = seconds / result.acked_spans * 1e6 if result.acked_spans else None
        row(f"  collector main: {name}", seconds, per_span, "acked")
    console.print(table)
    if result.projected_spans_per_s:
        total = sum(v for role, v in result.cpu_us_per_span.items() if role in PIPELINE)
        console.print(f"  pipeline CPU {total:.1f} µs/span → at most ~{result.projected_spans_per_s:,.0f} "
                      f"spans/s on {psutil.cpu_count()} cores if nothing else ran (sender excluded; derived "
                      "from CPU cost, not measured)")


def print_profile(role: str, profile: StackProfile, n: int = 15) -> None:
    if not profile.samples:
        console.print(f"py-spy {role}: no samples")
        return
    table = Table(title=f"py-spy {role}: top functions by self time "
                        f"({profile.samples:,} {profile.kind} samples)")
    for column in ("function (file)", "self", "inclusive", "note"):
        table.add_column(column, justify="right" if column in ("self", "inclusive") else "left")
    for frame, self_share, inclusive in profile.top(n):
        table.add_row(frame, f"{self_share:.1%}", f"{inclusive:.1%}", waiting_note(frame))
    console.print(table)
    if profile.threads:
        total = sum(profile.threads.values())
        shares = ", ".join(f"{t} {c / total:.0%}" for t, c in profile.threads.most_common(8))
        console.print(f"  by thread: {shares}")


def write_profile_summary(path: Path, profiles: dict[str, StackProfile], header: str) -> None:
    """A small text summary for bench/profiles/ (the collapsed stacks stay in --profile-dir)."""
    lines = [header, ""]
    for role, profile in profiles.items():
        lines.append(f"## {role}: {profile.samples} {profile.kind} samples")
        if profile.threads:
            total = sum(profile.threads.values())
            shares = ", ".join(f"{t} {c / total:.1%}" for t, c in profile.threads.most_common())
            lines.append(f"threads: {shares}")
        lines.append(f"{'self':>7} {'incl':>7}  function (file)")
        for frame, self_share, inclusive in profile.top(30):
            note = waiting_note(frame)
            lines.append(f"{self_share:7.1%} {inclusive:7.1%}  {frame}" + (f"  [{note}]" if note else ""))
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


# ========================================================================= main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--duration", type=float, default=60, help="measured window, s (default 60)")
    add("--warmup", type=float, default=5, help="sending before the window, s (default 5)")
    add("--protocol", choices=("http", "grpc", "both"), default="both")
    add("--rate", default="max", help="spans/s offered over all connections, or 'max' (default)")
    add("--connections", type=int, default=4, help="concurrent connections per protocol (default 4)")
    add("--spans-per-request", type=int, default=500)
    add("--payloads", type=int, default=64, help="distinct pre-built requests, sent round-robin (default 64)")
    add("--payload", choices=("auto", "synth", "builtin"), default="auto",
        help="auto: the traffic synthesizer if importable, else the built-in generator")
    add("--seed", type=int, default=7)
    add("--workers", type=int, default=2, help="collector writer processes (default 2)")
    add("--collector-env", action="append", default=[], metavar="KEY=VALUE",
        help="collector settings, e.g. FLEETLENS_COLLECTOR__BATCH_MAX_SPANS=50000 (repeatable)")
    add("--marker-interval", type=float, default=0.5)
    add("--poll-interval", type=float, default=0.2)
    add("--drain-timeout", type=float, default=120)
    add("--profile", action="store_true", help="py-spy every pipeline process during the window")
    add("--profile-seconds", type=int, default=0, help="py-spy duration (default: the window)")
    add("--profile-rate", type=int, default=50, help="py-spy samples/s per process (default 50)")
    add("--profile-dir", default="/tmp/fleetlens-bench-profiles", help="collapsed stacks (kept out of git)")
    add("--profile-summary", type=Path, default=None,
        help="text summary (default bench/profiles/collector_throughput-<protocol>.txt)")
    add("--phoenix", action="store_true", help="also measure Phoenix (.venv-phoenix) on the same payloads")
    add("--phoenix-duration", type=float, default=30)
    add("--phoenix-rate", default="300", help="spans/s offered to Phoenix (default 300, above what it "
        "ingests; 'max' floods its in-memory queue, which starves its database writer)")
    add("--json", type=Path, default=None, help="write every result to this file")
    add("--keep", action="store_true", help="keep the temp work dir (logs, spool, data)")
    args = parser.parse_args()
    for rate in (args.rate, args.phoenix_rate):
        if rate != "max" and float(rate) <= 0:
            parser.error("rates are positive numbers or 'max'")
    return args


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    with console.status("building payloads"):
        payloads, origin = build_payloads(args.payload, args.payloads, args.spans_per_request, args.seed)
    spans = sum(p.spans for p in payloads)
    size = sum(len(p.body) for p in payloads)
    console.print(f"{len(payloads)} payloads from the {origin}: {spans / len(payloads):.0f} spans, "
                  f"{size / len(payloads) / 1e3:,.0f} kB each ({size / spans:.0f} B/span)")
    workdir = Path(tempfile.mkdtemp(prefix="fleetlens-collector-bench-"))
    children: list[Child] = []
    phoenix: PushResult | str | None = None
    try:
        result, profiles, final_metrics = run_fleetlens(args, payloads, workdir, children)
        for child in reversed(children):
            child.stop()
        if args.phoenix:
            phoenix = run_phoenix(args, payloads, workdir, children)
    finally:
        for child in reversed(children):
            child.stop()
        if args.keep:
            console.print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results = report(result, profiles, final_metrics, phoenix, args, origin)
    if profiles:
        default = REPO / "bench" / "profiles" / f"collector_throughput-{args.protocol}.txt"
        summary = args.profile_summary or default
        header = (f"bench/collector_throughput.py {' '.join(sys.argv[1:])}\n"
                  f"written {result.written_per_s:,.0f} spans/s, acked {result.acked_per_s:,.0f} spans/s, "
                  f"load average {os.getloadavg()[0]:.1f} on {psutil.cpu_count()} cores; "
                  f"stacks in {args.profile_dir}")
        write_profile_summary(summary, profiles, header)
        console.print(f"profile summary: {summary}; collapsed stacks under {args.profile_dir}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
        console.print(f"results: {args.json}")
    console.print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
