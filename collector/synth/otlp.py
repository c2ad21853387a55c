"""Span groups → OTLP `ExportTraceServiceRequest` messages, what a collector receives on the wire.

Messages hold the spans of whole requests (a trace never straddles two messages), at most
`max_spans` each, grouped into one ResourceSpans per service (gateway first, then replicas in fleet
order) with one ScopeSpans each. A run's `replica.cold_start` spans go in messages of their own
(`cold_start_requests`), one ResourceSpans per replica launcher, as separate launchers would send
them. Building protobuf objects is per-span Python work (a few thousand requests per second); the
warehouse path (`direct.py`) skips it for scale runs.
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from .generate import RequestFrame, Synthesizer
from .spans import Attr, SpanGroup, cold_start_group, cold_start_resources, resources, span_groups

DEFAULT_MAX_SPANS = 1000


def any_value(value: Any) -> AnyValue:
    """A Python value as the OTLP AnyValue an SDK would send (bool before int: bool is an int)."""
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, (tuple, list)):
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    raise TypeError(f"no OTLP value for {type(value).__name__}")


def key_values(attributes: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=any_value(v)) for k, v in attributes.items()]


class _AttrEncoder:
    """Per-row KeyValues of one attribute column over rows lo..hi (categorical labels built once)."""

    def __init__(self, attr: Attr, lo: int, hi: int) -> None:
        self.key, self.kind = attr.key, attr.kind
        self.mask = attr.mask(len(attr.values))[lo:hi].tolist()
        if attr.kind == "cat":
            prebuilt = [KeyValue(key=attr.key, value=any_value(label)) for label in attr.labels]
            self.values = [prebuilt[c] if c >= 0 else None for c in attr.values[lo:hi].tolist()]
        elif attr.kind == "hex":
            self.values = [attr.prefix + bytes(row).hex() for row in attr.values[lo:hi]]
        else:
            self.values = attr.values[lo:hi].tolist()

    def __call__(self, j: int) -> KeyValue | None:
        if not self.mask[j]:
            return None
        kind = self.kind
        if kind == "cat":
            return self.values[j]
        if kind == "int":
            return KeyValue(key=self.key, value=AnyValue(int_value=self.values[j]))
        if kind == "micros":
            return KeyValue(key=self.key, value=AnyValue(double_value=self.values[j] / 1e6))
        return KeyValue(key=self.key, value=AnyValue(string_value=self.values[j]))


def group_spans(group: SpanGroup, lo: int, hi: int) -> list[tuple[int, Span]]:
    """(resource index, Span) for the group's rows lo..hi."""
    encoders = [_AttrEncoder(a, lo, hi) for a in group.attrs]
    events = group.events
    event_encoders = [_AttrEncoder(a, lo, hi) for a in events.attrs] if events else []
    trace_ids = group.trace_id[lo:hi].tobytes()
    span_ids = group.span_id[lo:hi].tobytes()
    parent_ids = group.parent_id[lo:hi].tobytes() if group.parent_id is not None else b""
    names = [group.name_labels[c] for c in group.name_codes[lo:hi].tolist()]
    starts, ends = group.start_ns[lo:hi].tolist(), group.end_ns[lo:hi].tolist()
    statuses = group.status[lo:hi].tolist()
    messages = [group.message_labels[c] if c >= 0 else "" for c in group.message_codes[lo:hi].tolist()]
    resources_ = group.resource[lo:hi].tolist()
    has_event = events.present[lo:hi].tolist() if events is not None else None
    event_times = events.time_ns[lo:hi].tolist() if events is not None else None
    out = []
    for j in range(hi - lo):
        span = Span(trace_id=trace_ids[16 * j:16 * j + 16], span_id=span_ids[8 * j:8 * j + 8],
                    parent_span_id=parent_ids[8 * j:8 * j + 8], name=names[j], kind=group.kind,
                    start_time_unix_nano=starts[j], end_time_unix_nano=ends[j])
        span.attributes.extend([kv for kv in (enc(j) for enc in encoders) if kv is not None])
        if has_event is not None and has_event[j]:
            event = span.events.add(time_unix_nano=event_times[j], name=events.name)
            event.attributes.extend([kv for kv in (enc(j) for enc in event_encoders) if kv is not None])
        if statuses[j] or messages[j]:
            span.status.CopyFrom(Status(code=statuses[j], message=messages[j]))
        out.append((resources_[j], span))
    return out


def _message(groups: list[SpanGroup], bounds: list[tuple[int, int]], resource_kvs: list[list[KeyValue]],
             ) -> ExportTraceServiceRequest:
    by_resource: dict[int, tuple[tuple[str, str], list[Span]]] = {}
    for group, (lo, hi) in zip(groups, bounds):
        if hi <= lo:
            continue
        for resource, span in group_spans(group, lo, hi):
            by_resource.setdefault(resource, (group.scope, []))[1].append(span)
    request = ExportTraceServiceRequest()
    for resource in sorted(by_resource):
        (scope_name, scope_version), spans = by_resource[resource]
        request.resource_spans.append(ResourceSpans(
            resource=Resource(attributes=resource_kvs[resource]),
            scope_spans=[ScopeSpans(scope=InstrumentationScope(name=scope_name, version=scope_version),
                                    spans=spans)]))
    return request


def export_requests(frame: RequestFrame, max_spans: int = DEFAULT_MAX_SPANS) -> Iterator[ExportTraceServiceRequest]:
    """The frame's spans as OTLP export requests of at most `max_spans` spans (whole traces each;
    a single trace larger than `max_spans` still goes out whole)."""
    resource_kvs = [key_values(attrs) for attrs in resources(frame.tables, frame.seed)]
    return _export(span_groups(frame), resource_kvs, len(frame), max_spans)


def cold_start_requests(synth: Synthesizer, max_spans: int = DEFAULT_MAX_SPANS,
                        ) -> Iterator[ExportTraceServiceRequest]:
    """The run's `replica.cold_start` spans (one per replica, ready at the run's start) as OTLP export
    requests of at most `max_spans` spans; sent once per run, not per chunk."""
    resource_kvs = [key_values(attrs) for attrs in cold_start_resources(synth.tables)]
    group = cold_start_group(synth.tables, synth.seed, synth.start_ns)
    return _export([group], resource_kvs, len(group), max_spans)


def _export(groups: list[SpanGroup], resource_kvs: list[list[KeyValue]], total: int, max_spans: int,
            ) -> Iterator[ExportTraceServiceRequest]:
    """Messages over `total` traces (a group's `request` = its trace's row, ascending), whole traces each."""
    per_request = np.zeros(total, dtype=np.int64)
    for group in groups:
        per_request += np.bincount(group.request, minlength=total)
    cumulative = np.cumsum(per_request)
    lo = 0
    while lo < total:
        base = cumulative[lo - 1] if lo else 0
        hi = int(np.searchsorted(cumulative, base + max_spans, side="right"))
        hi = max(hi, lo + 1)
        bounds = [(int(np.searchsorted(g.request, lo)), int(np.searchsorted(g.request, hi))) for g in groups]
        yield _message(groups, bounds, resource_kvs)
        lo = hi
