"""The gateway's OpenTelemetry setup: spans go to the collector in batches, off the request path.

Telemetry must never block or fail serving: spans are queued in memory and exported by a
background thread (the SDK's BatchSpanProcessor); if the collector is down or slow, exports fail
or the queue overflows and those spans are lost — counted in `ExportStats`, shown on the
gateway's /metrics — while requests go on being answered.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

from fleetlens.semconv import GATEWAY_SERVICE


@dataclass
class ExportStats:
    exported_spans: int = 0
    failed_spans: int = 0
    dropped_spans: int = 0  # the export queue was full (collector slow or down for long)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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
            with self.stats._lock:
                self.stats.dropped_spans += 1
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
