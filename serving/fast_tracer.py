"""A lean implementation of the OpenTelemetry tracing API for the gateway's request spans.

Why not the SDK's Tracer: a span there is ~20 µs to start and end (a lock, bounded attribute
maps, limits, a sampler and span-processor chain), ~150 µs for the seven spans of a request, all
on the event loop; with the SDK's encoder on top, tracing was a third of the gateway's CPU and
most of the latency it added at the 99th percentile (bench/gateway_overhead.py). A span here is
a small slotted object, ~3 µs.

It is the same API (`opentelemetry.trace.Tracer` / `Span`), so the gateway's code does not know
which one it has — tests hand it the SDK's tracer and read spans from an in-memory exporter —
and `propagate.inject` / `extract` work as usual. What it does, as the SDK does by default:
ids from `random.getrandbits`; a span joins the parent in its context (a remote one included,
with its trace state); parent-based sampling (a parent not sampled gives a NonRecordingSpan,
whose context still travels upstream); `record_exception` as an `exception` event; status
rules (OK is final, UNSET ignored). What it leaves out: span limits (the gateway sets a bounded
set of attributes), other samplers, several span processors — ended spans go to one `on_end`
(the LoopSpanProcessor).
"""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (INVALID_SPAN_ID, INVALID_TRACE_ID, Link, NonRecordingSpan, SpanContext, SpanKind,
                                 Status, StatusCode, TraceFlags)
from opentelemetry.util._decorator import _agnosticcontextmanager

_UNSET = Status(StatusCode.UNSET)
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class SpanEvent(NamedTuple):
    name: str
    timestamp: int
    attributes: Mapping[str, Any]


def _attribute_value(value: Any) -> Any:
    """Sequences are kept as tuples (a list the caller changes later must not change the span)."""
    if isinstance(value, list):
        return tuple(value)
    return value


class RecordedSpan(trace.Span):
    """A span being recorded; handed to `on_end` when it ends. Read like an SDK ReadableSpan:
    name, context, parent, kind, start_time, end_time, attributes, events, links, status."""

    __slots__ = ("name", "context", "parent", "kind", "start_time", "end_time", "attributes", "events",
                 "links", "status", "instrumentation_scope", "_on_end")

    def __init__(self, name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind,
                 attributes: Mapping[str, Any] | None, links: Sequence[Link] | None, start_time: int | None,
                 scope: InstrumentationScope, on_end: Callable[[RecordedSpan], None]) -> None:
        self.name = name
        self.context = context
        self.parent = parent
        self.kind = kind
        self.start_time = start_time if start_time is not None else time.time_ns()
        self.end_time: int | None = None
        self.attributes: dict[str, Any] = {}
        if attributes:
            self.set_attributes(attributes)
        self.events: list[SpanEvent] = []
        self.links: tuple[Link, ...] = tuple(links) if links else ()
        self.status = _UNSET
        self.instrumentation_scope = scope
        self._on_end = on_end

    def get_span_context(self) -> SpanContext:
        return self.context

    def is_recording(self) -> bool:
        return self.end_time is None

    def set_attribute(self, key: str, value: Any) -> None:
        if self.end_time is None:
            self.attributes[key] = _attribute_value(value)

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        if self.end_time is None:
            for key, value in attributes.items():
                self.attributes[key] = _attribute_value(value)

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None,
                  timestamp: int | None = None) -> None:
        if self.end_time is None:
            self.events.append(SpanEvent(name, timestamp if timestamp is not None else time.time_ns(),
                                         dict(attributes or {})))

    def update_name(self, name: str) -> None:
        if self.end_time is None:
            self.name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self.end_time is not None or self.status.status_code is StatusCode.OK:
            return
        if isinstance(status, StatusCode):
            status = Status(status, description)
        if status.status_code is not StatusCode.UNSET:
            self.status = status

    def record_exception(self, exception: BaseException, attributes: Mapping[str, Any] | None = None,
                         timestamp: int | None = None, escaped: bool = False) -> None:
        cls = type(exception)
        module = cls.__module__
        details = {"exception.type": cls.__qualname__ if module in ("", "builtins") else f"{module}.{cls.__qualname__}",
                   "exception.message": str(exception),
                   "exception.stacktrace": "".join(traceback.format_exception(exception)),
                   "exception.escaped": str(escaped)}
        self.add_event("exception", {**details, **(attributes or {})}, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self.end_time is not None:
            return
        self.end_time = end_time if end_time is not None else time.time_ns()
        self._on_end(self)

    def __repr__(self) -> str:
        return f"RecordedSpan({self.name!r}, span_id={self.context.span_id:016x})"


class FastTracer(trace.Tracer):
    def __init__(self, scope: InstrumentationScope, on_end: Callable[[RecordedSpan], None]) -> None:
        self.scope = scope
        self._on_end = on_end

    def start_span(self, name: str, context: Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
                   attributes: Mapping[str, Any] | None = None, links: Sequence[Link] | None = None,
                   start_time: int | None = None, record_exception: bool = True,
                   set_status_on_exception: bool = True) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        span_id = random.getrandbits(64)
        if parent.is_valid:
            trace_id, flags, state = parent.trace_id, parent.trace_flags, parent.trace_state
        else:
            parent = None
            trace_id = random.getrandbits(128)
            while trace_id == INVALID_TRACE_ID:
                trace_id = random.getrandbits(128)
            flags, state = _SAMPLED, None
        while span_id == INVALID_SPAN_ID:
            span_id = random.getrandbits(64)
        span_context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=flags, trace_state=state)
        if not flags.sampled:
            return NonRecordingSpan(span_context)
        return RecordedSpan(name, span_context, parent, kind, attributes, links, start_time, self.scope, self._on_end)

    @_agnosticcontextmanager
    def start_as_current_span(self, name: str, context: Context | None = None, kind: SpanKind = SpanKind.INTERNAL,
                              attributes: Mapping[str, Any] | None = None, links: Sequence[Link] | None = None,
                              start_time: int | None = None, record_exception: bool = True,
                              set_status_on_exception: bool = True, end_on_exit: bool = True) -> Iterator[trace.Span]:
        span = self.start_span(name, context, kind, attributes, links, start_time)
        with trace.use_span(span, end_on_exit=end_on_exit, record_exception=record_exception,
                            set_status_on_exception=set_status_on_exception) as current:
            yield current


class FastTracerProvider(trace.TracerProvider):
    """Tracers whose ended spans all go to `on_end` (one resource: the exporter's)."""

    def __init__(self, on_end: Callable[[RecordedSpan], None]) -> None:
        self._on_end = on_end
        self._tracers: dict[tuple[str, str], FastTracer] = {}

    def get_tracer(self, instrumenting_module_name: str, instrumenting_library_version: str | None = None,
                   schema_url: str | None = None, attributes: Any = None) -> FastTracer:
        key = (instrumenting_module_name, instrumenting_library_version or "")
        tracer = self._tracers.get(key)
        if tracer is None:
            scope = InstrumentationScope(instrumenting_module_name, instrumenting_library_version or "", schema_url)
            tracer = self._tracers[key] = FastTracer(scope, self._on_end)
        return tracer
