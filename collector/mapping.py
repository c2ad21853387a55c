"""OTLP spans → `otel_traces` rows, written exactly as the OpenTelemetry Collector's ClickHouse exporter
writes them (the pinned version named in fleetlens/schema/migrations/0001_otel_traces.sql).

This is the one place where spans become rows. The output is columnar (one list per column, in
`COLUMNS` order) because that is what the writer sends to ClickHouse.

Exporter rules followed here (checked against the exporter's code and its integration test, which
expects e.g. SpanKind "Internal", StatusCode "Error", Duration 60000000000 for a one-minute span):
- one row per span; `Timestamp` = start time (ns); `Duration` = end − start in ns as an unsigned
  64-bit subtraction (an end before the start wraps around, as in the exporter — downstream models
  treat such rows as invalid rather than this module silently "fixing" them);
- ids as lowercase hex, the empty string for an all-zero/absent id;
- `ServiceName` = the resource's `service.name` value as a string (empty if missing);
- `SpanKind` / `StatusCode` as pdata's `String()` names: `Server`, `Client`, `Internal`, ... and
  `Unset`, `Ok`, `Error`. (Exporter versions before the ScopeName/ScopeVersion columns wrote
  `SPAN_KIND_SERVER` / `STATUS_CODE_OK`; readers should accept both.)
- every attribute value stringified as pdata's `Value.AsString()` does: strings as-is, ints in
  decimal, bools `true`/`false`, doubles as ES6/JSON numbers (`1`, `0.1`, `1e-7`, `1e+21`),
  bytes base64, arrays and maps as compact JSON with sorted keys (current pdata does not
  HTML-escape `<`, `>`, `&`);
- `ScopeName` / `ScopeVersion` from the instrumentation scope (no longer copied into SpanAttributes);
  schema URLs, scope attributes, flags and dropped counts are not stored.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

COLUMNS: tuple[str, ...] = (
    "Timestamp", "TraceId", "SpanId", "ParentSpanId", "TraceState", "SpanName", "SpanKind", "ServiceName",
    "ResourceAttributes", "ScopeName", "ScopeVersion", "SpanAttributes", "Duration", "StatusCode", "StatusMessage",
    "Events.Timestamp", "Events.Name", "Events.Attributes",
    "Links.TraceId", "Links.SpanId", "Links.TraceState", "Links.Attributes",
)

SPAN_KINDS = ("Unspecified", "Internal", "Server", "Client", "Producer", "Consumer")
STATUS_CODES = ("Unset", "Ok", "Error")
_U64 = (1 << 64) - 1


@dataclass
class TraceColumns:
    """Rows of `otel_traces`, column by column (`COLUMNS` order)."""

    columns: dict[str, list[Any]] = field(default_factory=lambda: {name: [] for name in COLUMNS})

    def __len__(self) -> int:
        return len(self.columns["SpanId"])

    def as_lists(self) -> list[list[Any]]:
        return [self.columns[name] for name in COLUMNS]


def hex_id(raw: bytes) -> str:
    """Lowercase hex, or '' for an absent or all-zero id (the exporter's *ToHexOrEmptyString)."""
    return raw.hex() if raw.strip(b"\0") else ""


def format_double(value: float) -> str:
    """A float as Go's pdata renders it: the ES6 number-to-string rules, shortest round-trip digits."""
    if math.isnan(value) or math.isinf(value):
        go = "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")
        return f"json: unsupported value: {go}"
    if value == 0:
        return "-0" if math.copysign(1.0, value) < 0 else "0"
    magnitude = abs(value)
    shortest = Decimal(repr(value))
    if 1e-6 <= magnitude < 1e21:
        text = format(shortest.normalize(), "f")
        return text
    sign, digits, exponent = shortest.normalize().as_tuple()
    mantissa = str(digits[0]) + ("." + "".join(map(str, digits[1:])) if len(digits) > 1 else "")
    power = exponent + len(digits) - 1
    return f"{'-' if sign else ''}{mantissa}e{'+' if power >= 0 else '-'}{abs(power)}"


def _raw(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "double_value":
        return _JsonNumber(value.double_value)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    if kind == "array_value":
        return [_raw(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _raw(kv.value) for kv in value.kvlist_value.values}
    return None


class _JsonNumber(float):
    """A double inside JSON, rendered with Go's rules rather than Python's repr."""


def _go_json(value: Any) -> str:
    """Compact JSON with sorted keys, as Go's encoder without HTML escaping writes it."""
    return _dump(value).replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _dump(value: Any) -> str:
    if isinstance(value, _JsonNumber):
        return format_double(value)
    if isinstance(value, list):
        return "[" + ",".join(_dump(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(k, ensure_ascii=False) + ":" + _dump(value[k]) for k in sorted(value)) + "}"
    return json.dumps(value, ensure_ascii=False)


def value_as_string(value: AnyValue) -> str:
    """pdata `Value.AsString()` for one attribute value."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return str(value.int_value)
    if kind == "bool_value":
        return "true" if value.bool_value else "false"
    if kind == "double_value":
        return format_double(value.double_value)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode("ascii")
    if kind in ("array_value", "kvlist_value"):
        return _go_json(_raw(value))
    return ""


def attributes_to_map(attributes: Any) -> dict[str, str]:
    """Attributes as the exporter's ordered map: stringified values, entries sorted by key
    (ClickHouse keeps a Map's insertion order, so the order is part of the row). A repeated key
    keeps its last value. Python's string order is UTF-8 byte order, as in Go.

    This is the hottest loop of the collector (about 1 µs per attribute): strings — most values —
    take the short path, and the sort runs only when the sender's order was not sorted already."""
    out: dict[str, str] = {}
    for kv in attributes:
        value = kv.value
        text = value.string_value
        out[kv.key] = text if text else value_as_string(value)
    if len(out) > 1:
        keys = list(out)
        ordered = sorted(keys)
        if keys != ordered:
            out = {key: out[key] for key in ordered}
    return out


def _service_name(attributes: list[KeyValue] | Any) -> str:
    for kv in attributes:
        if kv.key == "service.name":
            return value_as_string(kv.value)
    return ""


def map_request(request: ExportTraceServiceRequest, into: TraceColumns | None = None) -> TraceColumns:
    """All spans of one OTLP export request as `otel_traces` columns (appended to `into` if given,
    so one batch of many requests becomes one columnar insert)."""
    out = TraceColumns() if into is None else into
    c = out.columns
    # bound appends: this loop runs once per span, and attribute lookups add up
    add_ts, add_trace, add_span, add_parent = (c[k].append for k in ("Timestamp", "TraceId", "SpanId",
                                                                     "ParentSpanId"))
    add_state, add_name, add_kind, add_service = (c[k].append for k in ("TraceState", "SpanName", "SpanKind",
                                                                          "ServiceName"))
    add_resource, add_scope, add_scope_version, add_attrs = (c[k].append for k in ("ResourceAttributes", "ScopeName",
                                                                                     "ScopeVersion", "SpanAttributes"))
    add_duration, add_status, add_message = (c[k].append for k in ("Duration", "StatusCode", "StatusMessage"))
    add_ev_ts, add_ev_name, add_ev_attrs = (c[k].append for k in ("Events.Timestamp", "Events.Name",
                                                                  "Events.Attributes"))
    add_ln_trace, add_ln_span, add_ln_state, add_ln_attrs = (c[k].append for k in (
        "Links.TraceId", "Links.SpanId", "Links.TraceState", "Links.Attributes"))
    kinds, codes = len(SPAN_KINDS), len(STATUS_CODES)
    for resource_spans in request.resource_spans:
        resource_attrs = resource_spans.resource.attributes
        resource_map = attributes_to_map(resource_attrs)
        service = _service_name(resource_attrs)
        for scope_spans in resource_spans.scope_spans:
            scope_name = scope_spans.scope.name
            scope_version = scope_spans.scope.version
            for span in scope_spans.spans:
                start = span.start_time_unix_nano
                add_ts(start)
                add_trace(hex_id(span.trace_id))
                add_span(hex_id(span.span_id))
                add_parent(hex_id(span.parent_span_id))
                add_state(span.trace_state)
                add_name(span.name)
                kind = span.kind
                add_kind(SPAN_KINDS[kind] if 0 <= kind < kinds else "")
                add_service(service)
                add_resource(resource_map)
                add_scope(scope_name)
                add_scope_version(scope_version)
                add_attrs(attributes_to_map(span.attributes))
                add_duration((span.end_time_unix_nano - start) & _U64)
                status = span.status
                code = status.code
                add_status(STATUS_CODES[code] if 0 <= code < codes else "")
                add_message(status.message)
                events = span.events
                if events:
                    add_ev_ts([e.time_unix_nano for e in events])
                    add_ev_name([e.name for e in events])
                    add_ev_attrs([attributes_to_map(e.attributes) for e in events])
                else:
                    add_ev_ts([])
                    add_ev_name([])
                    add_ev_attrs([])
                links = span.links
                if links:
                    add_ln_trace([hex_id(link.trace_id) for link in links])
                    add_ln_span([hex_id(link.span_id) for link in links])
                    add_ln_state([link.trace_state for link in links])
                    add_ln_attrs([attributes_to_map(link.attributes) for link in links])
                else:
                    add_ln_trace([])
                    add_ln_span([])
                    add_ln_state([])
                    add_ln_attrs([])
    return out
