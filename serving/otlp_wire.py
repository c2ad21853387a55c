"""OTLP/protobuf for the gateway's spans, written straight to the protobuf wire format.

Why not the SDK's encoder (`opentelemetry-exporter-otlp-proto-common`): it builds a message
object per span, attribute and value and then serializes them — ~20 µs a span, ~160 µs per
request for the gateway's seven spans, on the event loop that serves the requests
(bench/gateway_tracing_cost.py). Most of a request's attributes repeat from one request to the
next (stage names, customer, feature, route, model, replica, status codes): here each distinct
key/value pair (short strings, bools, integers) is encoded once and its bytes reused, so a
request's spans cost ~45 µs. The bytes are the same messages the SDK's encoder makes
(tests/test_serving_fast_tracer.py decodes both and compares).

The messages, from opentelemetry-proto (field numbers in brackets):
ExportTraceServiceRequest{resource_spans[1]} → ResourceSpans{resource[1], scope_spans[2]} →
ScopeSpans{scope[1], spans[2]} → Span{trace_id[1], span_id[2], trace_state[3], parent_span_id[4],
name[5], kind[6], start[7] fixed64, end[8] fixed64, attributes[9], events[11], links[13],
status[15], flags[16] fixed32}; KeyValue{key[1], value[2]}; AnyValue{string[1], bool[2], int[3],
double[4], array[5], kvlist[6], bytes[7]}.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from opentelemetry.trace import SpanContext, Status

# one-byte tags: field number << 3 | wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32)
_LEN1, _LEN2, _LEN3, _LEN4, _LEN5 = b"\x0a", b"\x12", b"\x1a", b"\x22", b"\x2a"
_SPAN_KIND, _SPAN_START, _SPAN_END = b"\x30", b"\x39", b"\x41"
_SPAN_ATTRIBUTE, _SPAN_EVENT, _SPAN_LINK, _SPAN_STATUS, _SPAN_FLAGS = b"\x4a", b"\x5a", b"\x6a", b"\x7a", b"\x85\x01"
_EVENT_TIME = b"\x09"
_LINK_FLAGS = b"\x35"
_STATUS_CODE = b"\x18"
_BOOL, _INT, _DOUBLE, _ARRAY, _KVLIST, _BYTES = b"\x10", b"\x18", b"\x21", b"\x2a", b"\x32", b"\x3a"

_FIXED64 = struct.Struct("<Q").pack
_FIXED32 = struct.Struct("<I").pack
_DOUBLE_BYTES = struct.Struct("<d").pack

# SpanFlags: the parent's remoteness is known (0x100), and it is remote (0x200)
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200

_CACHE_LIMIT = 8192   # distinct key/value pairs kept encoded; past it the cache starts over
_CACHED_TEXT = 256    # longer strings (prompts, when content recording is on) are not cached


class EncodableSpan(Protocol):
    """What is read off a span (the fast tracer's RecordedSpan; an SDK ReadableSpan has the same)."""

    name: str
    context: SpanContext
    parent: SpanContext | None
    kind: Any
    start_time: int | None
    end_time: int | None
    attributes: Mapping[str, Any]
    events: Sequence[Any]
    links: Sequence[Any]
    status: Status


def _varint(value: int) -> bytes:
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _int64(value: int) -> bytes:
    if not -(1 << 63) <= value < (1 << 63):
        raise ValueError(f"attribute value {value} does not fit in int64")
    return _varint(value & 0xFFFFFFFFFFFFFFFF)


def _field(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _text(tag: bytes, text: str) -> bytes:
    return _field(tag, text.encode("utf-8"))


def _any_value(value: Any) -> bytes:
    """An AnyValue message's content (empty for None, as the SDK writes it). bool is tested before
    int (bool is an int)."""
    if isinstance(value, str):
        return _text(_LEN1, value)
    if isinstance(value, bool):
        return _BOOL + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return _INT + _int64(value)
    if isinstance(value, float):
        return _DOUBLE + _DOUBLE_BYTES(value)
    if value is None:
        return b""
    if isinstance(value, bytes):
        return _field(_BYTES, value)
    if isinstance(value, Mapping):
        return _field(_KVLIST, b"".join(_field(_LEN1, _key_value(str(k), v)) for k, v in value.items()))
    if isinstance(value, Sequence):
        return _field(_ARRAY, b"".join(_field(_LEN1, _any_value(item)) for item in value))
    raise TypeError(f"attribute value of type {type(value).__name__} cannot be encoded")


def _key_value(key: str, value: Any) -> bytes:
    return _text(_LEN1, key) + _field(_LEN2, _any_value(value))


def _trace_state(context: SpanContext) -> str:
    state = context.trace_state
    return ",".join(f"{key}={value}" for key, value in state.items()) if state else ""


class OtlpSpanEncoder:
    """Encodes spans of one resource into serialized ExportTraceServiceRequests.

    `encode` is called on the event loop only (the cache is not locked)."""

    def __init__(self, resource_attributes: Mapping[str, Any]) -> None:
        self._resource = _field(_LEN1, b"".join(_field(_LEN1, _key_value(k, v))
                                                for k, v in resource_attributes.items()))
        self._scopes: dict[tuple[str, str], bytes] = {}
        self._pairs: dict[tuple[str, type, Any], bytes] = {}

    def encode(self, spans: Iterable[EncodableSpan]) -> bytes:
        """One ExportTraceServiceRequest: the resource, then the spans grouped by scope in order."""
        groups: list[tuple[bytes, list[bytes]]] = []
        for span in spans:
            scope = self._scope(getattr(span, "instrumentation_scope", None))
            if not groups or groups[-1][0] is not scope:
                groups.append((scope, []))
            groups[-1][1].append(_field(_LEN2, self._span(span)))
        scope_spans = b"".join(_field(_LEN2, scope + b"".join(encoded)) for scope, encoded in groups)
        return _field(_LEN1, self._resource + scope_spans)

    def _scope(self, scope: Any) -> bytes:
        name = getattr(scope, "name", "") or ""
        version = getattr(scope, "version", "") or ""
        key = (name, version)
        encoded = self._scopes.get(key)
        if encoded is None:
            content = (_text(_LEN1, name) if name else b"") + (_text(_LEN2, version) if version else b"")
            encoded = self._scopes[key] = _field(_LEN1, content)
        return encoded

    def _pair(self, key: str, value: Any) -> bytes:
        """A KeyValue field of a span, event or link (field 9 of Span; 3 of Event; 4 of Link share
        its content), from the cache when the pair is a short string, bool or number seen before."""
        kind = type(value)
        if kind is str and len(value) > _CACHED_TEXT or kind not in (str, bool, int):  # floats rarely repeat
            return _key_value(key, value)
        cache_key = (key, kind, value)
        encoded = self._pairs.get(cache_key)
        if encoded is None:
            if len(self._pairs) >= _CACHE_LIMIT:
                self._pairs.clear()
            encoded = self._pairs[cache_key] = _key_value(key, value)
        return encoded

    def _attributes(self, tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
        if not attributes:
            return b""
        return b"".join(_field(tag, self._pair(key, value)) for key, value in attributes.items())

    def _span(self, span: EncodableSpan) -> bytes:
        context = span.context
        parent = span.parent
        out = [_field(_LEN1, context.trace_id.to_bytes(16, "big")), _field(_LEN2, context.span_id.to_bytes(8, "big"))]
        state = _trace_state(context)
        if state:
            out.append(_text(_LEN3, state))
        if parent is not None:
            out.append(_field(_LEN4, parent.span_id.to_bytes(8, "big")))
        out += [_text(_LEN5, span.name), _SPAN_KIND, _varint(span.kind.value + 1),  # OTLP kinds start at 1
                _SPAN_START, _FIXED64(span.start_time or 0), _SPAN_END, _FIXED64(span.end_time or 0),
                self._attributes(_SPAN_ATTRIBUTE, span.attributes)]
        for event in span.events or ():
            content = _EVENT_TIME + _FIXED64(event.timestamp) + _text(_LEN2, event.name)
            out.append(_field(_SPAN_EVENT, content + self._attributes(_LEN3, event.attributes)))
        for link in span.links or ():
            linked = link.context
            content = _field(_LEN1, linked.trace_id.to_bytes(16, "big")) + _field(_LEN2, linked.span_id.to_bytes(8, "big"))
            link_state = _trace_state(linked)
            if link_state:
                content += _text(_LEN3, link_state)
            content += self._attributes(_LEN4, link.attributes)
            content += _LINK_FLAGS + _FIXED32(_HAS_IS_REMOTE | (_IS_REMOTE if linked.is_remote else 0))
            out.append(_field(_SPAN_LINK, content))
        status = span.status
        code = status.status_code.value if status is not None else 0
        message = (status.description or "") if status is not None else ""
        out.append(_field(_SPAN_STATUS, (_text(_LEN2, message) if message else b"")
                          + (_STATUS_CODE + _varint(code) if code else b"")))
        flags = _HAS_IS_REMOTE | (_IS_REMOTE if parent is not None and parent.is_remote else 0)
        out += [_SPAN_FLAGS, _FIXED32(flags)]
        return b"".join(out)
