"""A small OTLP trace sender that retries as the OTLP specification says, for the durability tests.

- Payloads are built up front (`build_requests`): serialized `ExportTraceServiceRequest`s with
  unique random span ids, so what was sent can be checked span by span in ClickHouse.
- OTLP/HTTP (httpx): retry on connection errors and on 429, 502, 503, 504, honouring
  `Retry-After` (capped) and otherwise backing off exponentially with jitter, until 200. Any other
  status is a permanent failure (the spec says: drop the data) and is recorded as such.
- OTLP/gRPC (grpcio, `TraceServiceStub`): retry on the spec's retryable codes (UNAVAILABLE,
  CANCELLED, DEADLINE_EXCEEDED, ABORTED, OUT_OF_RANGE, DATA_LOSS) and on RESOURCE_EXHAUSTED when
  the server sent RetryInfo (`google.rpc.retryinfo-bin` trailing metadata), honouring its delay.

`OtlpSender` runs `concurrency` threads in the background; it records every span id whose request
was acknowledged (200 / OK), every answer it saw, and when.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import grpc
import httpx
from google.rpc import error_details_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import TraceServiceStub

RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
RETRYABLE_GRPC = frozenset({
    grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED,
    grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})
PROTOBUF = "application/x-protobuf"


@dataclass(frozen=True)
class Payload:
    body: bytes  # serialized ExportTraceServiceRequest
    span_ids: tuple[str, ...]  # lowercase hex, as otel_traces stores SpanId


def build_requests(count: int, spans_per_request: int = 200, *, service: str = "durability",
                   padding_bytes: int = 0, seed: int | None = None) -> list[Payload]:
    """`count` requests of `spans_per_request` spans each, every span id unique (random, non-zero).
    `padding_bytes` adds one attribute of that size to every span, for large requests."""
    rng = random.Random(seed if seed is not None else int.from_bytes(os.urandom(8), "little"))
    seen: set[bytes] = set()
    now = time.time_ns()
    padding = "x" * padding_bytes
    out: list[Payload] = []
    for r in range(count):
        request = ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        resource_spans.resource.attributes.add(key="service.name").value.string_value = service
        resource_spans.resource.attributes.add(key="host.name").value.string_value = f"replica-{r % 4}"
        scope_spans = resource_spans.scope_spans.add()
        scope_spans.scope.name = "fleetlens.tests.durability"
        ids: list[str] = []
        trace_id = b""
        for i in range(spans_per_request):
            span_id = b"\x00" * 8
            while span_id == b"\x00" * 8 or span_id in seen:
                span_id = rng.randbytes(8)
            seen.add(span_id)
            if i % 8 == 0:
                trace_id = rng.randbytes(16)
            start = now + (r * spans_per_request + i) * 1000
            span = scope_spans.spans.add(trace_id=trace_id, span_id=span_id, name=f"request {i % 5}", kind=2,
                                         start_time_unix_nano=start, end_time_unix_nano=start + 1_500_000)
            span.attributes.add(key="gen_ai.request.model").value.string_value = "llama-3-8b"
            span.attributes.add(key="fleetlens.customer").value.string_value = f"customer-{i % 7}"
            span.attributes.add(key="gen_ai.usage.input_tokens").value.int_value = 100 + i
            span.attributes.add(key="fleetlens.request.index").value.int_value = r
            if padding:
                span.attributes.add(key="fleetlens.padding").value.string_value = padding
            ids.append(span_id.hex())
        out.append(Payload(request.SerializeToString(), tuple(ids)))
    return out


@dataclass
class SenderStats:
    """Everything the sender saw. Mutated under `lock` by the sender threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    acked_span_ids: set[str] = field(default_factory=set)
    acked_requests: int = 0
    duplicate_acks: int = 0  # a request acknowledged twice cannot happen: the sender stops at the first 200
    attempts: int = 0
    answers: Counter[str] = field(default_factory=Counter)  # "200", "429", "503", "grpc:UNAVAILABLE", ...
    retry_after_s: Counter[float] = field(default_factory=Counter)  # server-suggested delays seen
    refused_without_delay: int = 0  # 429/503 without Retry-After, RESOURCE_EXHAUSTED without RetryInfo
    transport_errors: Counter[str] = field(default_factory=Counter)  # connection refused/reset, timeouts
    transport_error_details: list[str] = field(default_factory=list)  # the first few, for the report
    permanent_failures: list[str] = field(default_factory=list)  # non-retryable answers: data dropped
    partial_rejections: int = 0
    ack_times: list[float] = field(default_factory=list)  # time.monotonic() of each acknowledgement
    refusal_times: list[float] = field(default_factory=list)

    def snapshot(self) -> dict[str, object]:
        with self.lock:
            return {
                "acked_requests": self.acked_requests, "acked_spans": len(self.acked_span_ids),
                "attempts": self.attempts, "answers": dict(self.answers),
                "retry_after_s": dict(self.retry_after_s),
                "refused_without_delay": self.refused_without_delay,
                "transport_errors": dict(self.transport_errors),
                "transport_error_details": list(self.transport_error_details[:3]),
                "permanent_failures": list(self.permanent_failures[:5]),
                "partial_rejections": self.partial_rejections,
            }


class OtlpSender:
    """Sends `payloads` with `concurrency` background threads, each request retried until it is
    acknowledged (or `stop()`); `protocol` is "http" (target: base URL) or "grpc" (target: host:port)."""

    def __init__(self, payloads: list[Payload], *, protocol: str, target: str, concurrency: int = 1,
                 pause_s: float = 0.0, retry_after_cap_s: float = 5.0, backoff_initial_s: float = 0.05,
                 backoff_max_s: float = 2.0, timeout_s: float = 30.0) -> None:
        assert protocol in ("http", "grpc")
        self.payloads = payloads
        self.protocol = protocol
        self.target = target
        self.concurrency = concurrency
        self.pause_s = pause_s
        self.retry_after_cap_s = retry_after_cap_s
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.timeout_s = timeout_s
        self.stats = SenderStats()
        self.sent_span_ids: set[str] = set()  # spans of every request tried at least once
        self._queue: queue.Queue[Payload] = queue.Queue()
        for payload in payloads:
            self._queue.put(payload)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._channel: grpc.Channel | None = None
        self.errors: list[BaseException] = []  # bugs in the sender itself

    # ------------------------------------------------------------- control
    def start(self) -> "OtlpSender":
        if self.protocol == "grpc":
            self._channel = grpc.insecure_channel(self.target, options=[
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.enable_retries", 0),  # every retry is ours, counted
                ("grpc.max_send_message_length", 64 * 1024**2),
            ])
        for n in range(self.concurrency):
            thread = threading.Thread(target=self._worker, name=f"otlp-sender-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop sending: requests not acknowledged yet are abandoned (never counted as acked)."""
        self._stop.set()

    def join(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        done = not any(t.is_alive() for t in self._threads)
        if done and self._channel is not None:
            self._channel.close()
            self._channel = None
        return done

    def close(self, timeout_s: float = 40.0) -> None:
        self.stop()
        self.join(timeout_s)

    @property
    def finished(self) -> bool:
        return bool(self._threads) and not any(t.is_alive() for t in self._threads)

    @property
    def all_acked(self) -> bool:
        with self.stats.lock:
            return self.stats.acked_requests == len(self.payloads)

    @property
    def acked_requests(self) -> int:
        with self.stats.lock:
            return self.stats.acked_requests

    def acked_ids(self) -> set[str]:
        with self.stats.lock:
            return set(self.stats.acked_span_ids)

    # --------------------------------------------------------------- sending
    def _worker(self) -> None:
        try:
            client = httpx.Client(timeout=self.timeout_s) if self.protocol == "http" else None
            stub = TraceServiceStub(self._channel) if self.protocol == "grpc" else None
            try:
                while not self._stop.is_set():
                    try:
                        payload = self._queue.get_nowait()
                    except queue.Empty:
                        return
                    with self.stats.lock:
                        self.sent_span_ids.update(payload.span_ids)
                    self._send_until_acked(payload, client, stub)
                    if self.pause_s:
                        self._stop.wait(self.pause_s)
            finally:
                if client is not None:
                    client.close()
        except BaseException as error:  # noqa: BLE001 - surfaced by the tests
            self.errors.append(error)
            raise

    def _send_until_acked(self, payload: Payload, client: httpx.Client | None,
                          stub: TraceServiceStub | None) -> None:
        attempt = 0
        while not self._stop.is_set():
            attempt += 1
            with self.stats.lock:
                self.stats.attempts += 1
            if client is not None:
                outcome = self._try_http(client, payload)
            else:
                assert stub is not None
                outcome = self._try_grpc(stub, payload)
            if outcome is True:
                return
            if outcome is False:  # permanent failure: OTLP says drop it
                return
            delay = outcome if outcome is not None else self._backoff(attempt)
            self._stop.wait(delay)

    def _backoff(self, attempt: int) -> float:
        delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** min(attempt - 1, 10))
        return delay * random.uniform(0.5, 1.0)

    def _acked(self, payload: Payload, rejected: int) -> bool:
        now = time.monotonic()
        with self.stats.lock:
            self.stats.acked_requests += 1
            before = len(self.stats.acked_span_ids)
            self.stats.acked_span_ids.update(payload.span_ids)
            if len(self.stats.acked_span_ids) - before != len(payload.span_ids):
                self.stats.duplicate_acks += 1
            self.stats.partial_rejections += rejected
            self.stats.ack_times.append(now)
        return True

    def _transport_error(self, kind: str, detail: str) -> None:
        with self.stats.lock:
            self.stats.transport_errors[kind] += 1
            if len(self.stats.transport_error_details) < 20:
                self.stats.transport_error_details.append(f"{kind}: {detail[:300]}")

    def _refused(self, delay_s: float | None) -> float | None:
        """A retryable refusal with the server's suggested delay (None: back off on our own)."""
        with self.stats.lock:
            self.stats.refusal_times.append(time.monotonic())
            if delay_s is None:
                self.stats.refused_without_delay += 1
            else:
                self.stats.retry_after_s[delay_s] += 1
        return None if delay_s is None else min(self.retry_after_cap_s, delay_s) * random.uniform(0.8, 1.0)

    def _try_http(self, client: httpx.Client, payload: Payload) -> bool | float | None:
        try:
            reply = client.post(self.target + "/v1/traces", content=payload.body,
                                headers={"content-type": PROTOBUF})
        except httpx.TransportError as error:
            self._transport_error(type(error).__name__, repr(error))
            return None
        with self.stats.lock:
            self.stats.answers[str(reply.status_code)] += 1
        if reply.status_code == 200:
            response = ExportTraceServiceResponse.FromString(reply.content)
            return self._acked(payload, response.partial_success.rejected_spans)
        if reply.status_code in RETRYABLE_HTTP:
            return self._refused(_retry_after(reply.headers.get("retry-after")))
        with self.stats.lock:
            self.stats.permanent_failures.append(f"HTTP {reply.status_code}: {reply.content[:200]!r}")
        return False

    def _try_grpc(self, stub: TraceServiceStub, payload: Payload) -> bool | float | None:
        try:
            response = stub.Export(ExportTraceServiceRequest.FromString(payload.body), timeout=self.timeout_s)
        except grpc.RpcError as error:
            code = error.code()  # type: ignore[attr-defined]
            with self.stats.lock:
                self.stats.answers[f"grpc:{code.name}"] += 1
            delay = _retry_info(error)
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and delay is not None:
                return self._refused(delay)
            if code in RETRYABLE_GRPC:
                if code == grpc.StatusCode.UNAVAILABLE and delay is None:
                    # no server behind the port (connection refused / reset): a transport error
                    details = str(error.details())  # type: ignore[attr-defined]
                    self._transport_error(f"grpc:{code.name}", details)
                    return None
                return self._refused(delay)
            with self.stats.lock:
                details = str(error.details())  # type: ignore[attr-defined]
                self.stats.permanent_failures.append(f"gRPC {code.name}: {details}")
            return False
        with self.stats.lock:
            self.stats.answers["grpc:OK"] += 1
        return self._acked(payload, response.partial_success.rejected_spans)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: not used by the collector; back off on our own


def _retry_info(error: grpc.RpcError) -> float | None:
    for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "google.rpc.retryinfo-bin":
            info = error_details_pb2.RetryInfo.FromString(value)
            return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    return None
