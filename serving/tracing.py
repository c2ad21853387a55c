"""OpenTelemetry setup: spans go to the collector in batches, off the request path.

Telemetry must never block or fail serving: spans are queued in memory and exported in the
background; if the collector is down or slow, exports fail or the queue overflows and those spans
are lost — counted in `ExportStats`, shown on the gateway's /metrics — while requests go on being
answered.

Two ways to export:
- `loop_tracer_provider` (the gateway): spans from the lean `FastTracer`, encoded on the gateway's
  own event loop (`OtlpSpanEncoder`), a small slice at a time as they end, and POSTed in batches
  with aiohttp (`LoopSpanProcessor`), so no thread competes with serving for the GIL and no burst
  of encoding holds requests up;
- `tracer_provider` (the SDK's BatchSpanProcessor and its worker thread) for synchronous code such
  as the replica launcher.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.environment_variables import OTEL_SDK_DISABLED
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from fleetlens.semconv import GATEWAY_SERVICE

from .fast_tracer import FastTracerProvider, RecordedSpan
from .otlp_wire import OtlpSpanEncoder

log = logging.getLogger("fleetlens.gateway")


@dataclass
class ExportStats:
    exported_spans: int = 0
    failed_spans: int = 0
    dropped_spans: int = 0  # the export queue was full (collector slow or down for long)
    retried_spans: int = 0  # sent again after the collector asked to retry (429/502/503/504) or was unreachable
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def retry(self, count: int) -> None:
        with self._lock:
            self.retried_spans += count

    def drop(self, count: int = 1) -> None:
        with self._lock:
            self.dropped_spans += count

    def add(self, ok: bool, count: int) -> None:
        with self._lock:
            if ok:
                self.exported_spans += count
            else:
                self.failed_spans += count


class CountingExporter(SpanExporter):
    """Wraps an exporter and counts what reached the collector and what did not."""

    def __init__(self, inner: SpanExporter, stats: ExportStats) -> None:
        self.inner = inner
        self.stats = stats

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self.inner.export(spans)
        except Exception:  # noqa: BLE001 - an exporter bug must not take the gateway down
            result = SpanExportResult.FAILURE
        self.stats.add(result == SpanExportResult.SUCCESS, len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """A BatchSpanProcessor that counts the spans it drops because its queue is full."""

    def __init__(self, exporter: SpanExporter, stats: ExportStats, **kwargs: Any) -> None:
        super().__init__(exporter, **kwargs)
        self.stats = stats
        self._max_queue = kwargs.get("max_queue_size") or 2048

    def on_end(self, span: ReadableSpan) -> None:
        queue = getattr(getattr(self, "_batch_processor", None), "_queue", None)
        if queue is not None and len(queue) >= self._max_queue:
            self.stats.drop()
        super().on_end(span)


def tracer_provider(exporter: SpanExporter, *, service_name: str = GATEWAY_SERVICE,
                    stats: ExportStats | None = None) -> tuple[TracerProvider, ExportStats]:
    """A provider whose spans are batched to `exporter` (counted)."""
    stats = stats or ExportStats()
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(CountingBatchSpanProcessor(CountingExporter(exporter, stats), stats,
                                                           max_queue_size=16_384, schedule_delay_millis=500,
                                                           max_export_batch_size=2048))
    return provider, stats


def otlp_exporter(endpoint: str, timeout_s: float = 5.0) -> SpanExporter:
    """OTLP/HTTP protobuf to `endpoint` (a collector base URL such as http://127.0.0.1:4318)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces", timeout=timeout_s)


@dataclass
class EncodedSpans:
    """One encoded ExportTraceServiceRequest, waiting to be sent."""

    body: bytes
    spans: int


class LoopSpanProcessor(SpanProcessor):
    """Encodes ended spans a few at a time on the event loop (with `encode`: spans → a serialized
    ExportTraceServiceRequest) and exports them (OTLP/HTTP protobuf) in batches from it.

    Why not the SDK's BatchSpanProcessor in the gateway: its worker thread encodes a batch (~20 µs
    a span) holding the GIL, and the event-loop thread, which gives the GIL up at every socket
    call, then waits up to the switch interval (5 ms) to get it back each time — the convoy
    effect. With 50 streams through the gateway that made 20–40 ms stalls of the loop.

    Why encode as spans end rather than when a batch is sent: a batch of half a second's spans
    (~500 at 150 requests/s) is ~10 ms of encoding; even cut into slices with yields between them,
    every request in flight then waits behind a slice at each of its steps, and the p99 of the
    latency the gateway adds rose by ~3 ms (bench/gateway_overhead.py). Encoded `slice_spans` (8,
    ~0.15 ms) at a time, in a callback scheduled when that many have ended, the same work is spread
    evenly: about one small piece per request, after the step that ended them. The export task
    only joins bytes and POSTs them with aiohttp.

    Serialized ExportTraceServiceRequests concatenate into one valid request (protobuf merges
    repeated fields by appending), so the pieces go out as one POST (up to `max_body_bytes`).

    A collector that asks to retry (429, 502, 503, 504, as OTLP/HTTP says) or cannot be reached gets
    the spans again later: they go back to the front of the queue and the export waits (the
    collector's Retry-After, else 0.5 s doubling to `max_backoff_s`); a collector briefly overloaded
    or restarting costs nothing. Other answers (400, 413) would fail again: those spans are counted
    lost. Whatever the queue (`max_queue` spans, encoded or not) cannot hold is dropped and counted,
    and `aclose()` tries once more.

    `start()` and `aclose()` run on the loop (the gateway's lifespan); spans ended before
    `start()` wait in the queue, and past `max_queue` they are dropped and counted.
    """

    RETRYABLE = frozenset({429, 502, 503, 504})

    def __init__(self, endpoint: str, encode: Callable[[Sequence[Any]], bytes], stats: ExportStats | None = None, *,
                 max_queue: int = 16_384,
                 batch_spans: int = 2048, delay_s: float = 0.5, slice_spans: int = 8,
                 timeout_s: float = 5.0, max_body_bytes: int = 4 * 1024**2, max_backoff_s: float = 5.0) -> None:
        self.url = endpoint.rstrip("/") + "/v1/traces"
        self.encode = encode
        self.stats = stats or ExportStats()
        self.max_queue, self.batch_spans, self.delay_s = max_queue, batch_spans, delay_s
        self.slice_spans, self.timeout_s, self.max_body_bytes = slice_spans, timeout_s, max_body_bytes
        self._ended: deque[Any] = deque()             # not encoded yet
        self._encoded: deque[EncodedSpans] = deque()  # encoded, not sent yet
        self._encoded_spans = 0
        self._encode_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: Any = None
        self._closing = False
        self.max_backoff_s = max_backoff_s
        self._backoff_s = 0.0      # the last wait; 0 after a success
        self._retry_at = 0.0       # loop time before which nothing is sent

    @property
    def queued(self) -> int:
        """Spans waiting to be sent (encoded or not)."""
        return len(self._ended) + self._encoded_spans

    # -------------------------------------------------------------- SpanProcessor (any thread)
    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: RecordedSpan | ReadableSpan) -> None:
        if not span.context.trace_flags.sampled:
            return
        if self.queued >= self.max_queue:
            self.stats.drop()
            return
        self._ended.append(span)
        if len(self._ended) >= self.slice_spans and not self._encode_scheduled and self._loop is not None:
            self._encode_scheduled = True
            if threading.get_ident() == self._loop_thread:
                self._loop.call_soon(self._encode_ended)
            else:
                self._loop.call_soon_threadsafe(self._encode_ended)

    def shutdown(self) -> None:
        pass  # the loop's `aclose()` sends what is left

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return not self.queued  # flushing needs the loop: `await flush()`

    # -------------------------------------------------------------- on the event loop
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        self._task = asyncio.create_task(self._run(), name="fleetlens-span-export")

    def _encode_ended(self) -> None:
        """Encode one slice of the ended spans; another callback follows while a whole slice waits,
        so waiting requests run between slices."""
        self._encode_scheduled = False
        self._encode(self.slice_spans)
        if len(self._ended) >= self.slice_spans and self._loop is not None:
            self._encode_scheduled = True
            self._loop.call_soon(self._encode_ended)
        if self._encoded_spans >= self.batch_spans and self._wake is not None:
            self._wake.set()

    def _encode(self, count: int) -> None:
        ended = self._ended
        piece = [ended.popleft() for _ in range(min(count, len(ended)))]  # O(slice) even when a burst queued many
        if not piece:
            return
        try:
            body = self.encode(piece)
        except Exception as error:  # noqa: BLE001 - spans the encoder refuses are lost, not the gateway
            log.debug("span encoding failed: %s", error)
            self.stats.add(False, len(piece))
            return
        self._encoded.append(EncodedSpans(body, len(piece)))
        self._encoded_spans += len(piece)

    async def _run(self) -> None:
        assert self._wake is not None and self._loop is not None
        while not self._closing:
            wait = max(self.delay_s, self._retry_at - self._loop.time())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            self._wake.clear()
            await self.flush()
        await self.flush()  # closing: what ended since

    async def flush(self) -> None:
        """Send everything queued now, a batch at a time; stops early while the collector asked to wait
        (the spans stay queued)."""
        while self.queued and (self._closing or self._loop is None or self._loop.time() >= self._retry_at):
            while self._ended:  # the few ended since the last slice (all of them when closing)
                self._encode(self.slice_spans)
                await asyncio.sleep(0)
            if not await self._export_batch():
                return

    async def _export_batch(self) -> bool:
        """Send one batch (up to `batch_spans` spans and `max_body_bytes`); False when the collector
        asked to retry (the batch is queued again, at the front)."""
        batch: list[EncodedSpans] = []
        spans = size = 0
        while self._encoded and (not batch or (spans + self._encoded[0].spans <= self.batch_spans
                                               and size + len(self._encoded[0].body) <= self.max_body_bytes)):
            piece = self._encoded.popleft()
            batch.append(piece)
            spans += piece.spans
            size += len(piece.body)
        self._encoded_spans -= spans
        if not await self._post(b"".join(piece.body for piece in batch), spans):
            self._requeue(batch)
            return False
        return True

    async def _post(self, body: bytes, spans: int) -> bool:
        """POST one body; True when done with its spans (sent, or refused for good: counted lost),
        False when the collector should get them again later (not counted yet)."""
        ok, retry_after = False, None
        try:  # counted once, whatever happens (cancellation included)
            async with self._session.post(self.url, data=body,
                                          headers={"Content-Type": "application/x-protobuf"}) as response:
                await response.read()
                ok = response.status == 200
                if not ok:
                    log.debug("span export: collector answered %s", response.status)
                    if response.status in self.RETRYABLE:
                        retry_after = _seconds(response.headers.get("Retry-After"))
                        retry_after = -1.0 if retry_after is None else retry_after
        except asyncio.CancelledError:  # aclose() gave up waiting: these spans are lost, counted
            self.stats.add(False, spans)
            raise
        except Exception as error:  # noqa: BLE001 - a collector that is down or slow costs spans, never requests
            log.debug("span export failed: %s", error)
            retry_after = -1.0
        if retry_after is not None and not self._closing:
            self._back_off(retry_after)
            self.stats.retry(spans)
            return False
        self.stats.add(ok, spans)
        if ok:
            self._backoff_s = 0.0
        return True

    def _back_off(self, retry_after: float) -> None:
        """Wait the collector's Retry-After (at most max_backoff_s), else twice the last wait."""
        if retry_after >= 0:
            self._backoff_s = min(retry_after, self.max_backoff_s)
        else:
            self._backoff_s = min(max(0.5, self._backoff_s * 2), self.max_backoff_s)
        assert self._loop is not None
        self._retry_at = self._loop.time() + self._backoff_s

    def _requeue(self, batch: list[EncodedSpans]) -> None:
        """Put an unsent batch back at the front, in order; what no longer fits is dropped and counted."""
        for piece in reversed(batch):
            if self.queued + piece.spans > self.max_queue:
                self.stats.drop(piece.spans)
                continue
            self._encoded.appendleft(piece)
            self._encoded_spans += piece.spans

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Send what is left (for at most `timeout_s`; what is not sent by then is counted lost)."""
        self._closing = True
        if self._task is not None and self._wake is not None:
            self._wake.set()
            try:
                await asyncio.wait_for(self._task, timeout_s)  # its last round flushes the queue
            except TimeoutError:
                pass  # wait_for cancelled it; the batch it was sending is counted failed
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.queued:
            self.stats.add(False, self.queued)
            self._ended.clear()
            self._encoded.clear()
            self._encoded_spans = 0


def loop_tracer_provider(endpoint: str, *, service_name: str = GATEWAY_SERVICE,
                         stats: ExportStats | None = None) -> tuple[trace.TracerProvider, LoopSpanProcessor]:
    """The gateway's tracing: FastTracer spans, encoded and exported from the event loop (see
    LoopSpanProcessor), as the resource `service.name` = `service_name` (plus what
    OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME say, as with the SDK). OTEL_SDK_DISABLED=true
    turns tracing off as it does the SDK: no-op spans, nothing exported."""
    resource = Resource.create({"service.name": service_name})
    processor = LoopSpanProcessor(endpoint, OtlpSpanEncoder(resource.attributes).encode, stats)
    if os.environ.get(OTEL_SDK_DISABLED, "").strip().lower() == "true":
        return trace.NoOpTracerProvider(), processor
    return FastTracerProvider(processor.on_end), processor


def _seconds(header: str | None) -> float | None:
    """A Retry-After in seconds (the collector sends seconds; an HTTP date is not used here)."""
    try:
        return max(0.0, float(header)) if header else None
    except ValueError:
        return None
