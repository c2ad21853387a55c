"""Decoding and screening OTLP trace requests, the part both receivers (gRPC and HTTP) share.

Screening decides, before anything is acknowledged, which spans are acceptable: OTLP requires
16-byte trace ids and 8-byte span ids, and a single attribute value larger than
`max_attribute_value_bytes` is refused rather than silently truncated. Rejected spans are reported
back to the sender as OTLP partial success; a request with nothing acceptable is a 400 /
INVALID_ARGUMENT. The accepted spans travel on as the serialized protobuf request (the original
bytes when nothing was rejected, so the common path costs no re-encoding).
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from dataclasses import dataclass

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

# DateTime64(9) ends at 2262-04-11; a later timestamp could never be stored.
MAX_TIMESTAMP_NS = 9_223_372_036_854_775_807
PROTOBUF = "application/x-protobuf"
JSON = "application/json"


class BadRequest(ValueError):
    """The request cannot be used at all (HTTP 400 / gRPC INVALID_ARGUMENT)."""


class TooLarge(ValueError):
    """The request is over the size limit, on the wire or decompressed (413 / RESOURCE_EXHAUSTED)."""


@dataclass
class Screened:
    payload: bytes  # serialized ExportTraceServiceRequest of the accepted spans
    accepted: int
    rejected: int
    message: str = ""


def gunzip(body: bytes, limit: int) -> bytes:
    """Decompress a gzip body — every member, as Go's reader does — stopping as soon as the output
    would exceed `limit` (gzip bombs). Anything after the last member but zero padding is an error."""
    out = bytearray()
    rest = body
    while True:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            out += inflater.decompress(rest, limit + 1 - len(out))
            if len(out) > limit or inflater.unconsumed_tail:
                raise TooLarge(f"request is over {limit} bytes once decompressed")
            out += inflater.flush()
        except zlib.error as error:
            raise BadRequest(f"body is not valid gzip: {error}") from None
        if len(out) > limit:
            raise TooLarge(f"request is over {limit} bytes once decompressed")
        if not inflater.eof:
            raise BadRequest("gzip body is truncated")
        rest = inflater.unused_data
        if not rest.strip(b"\0"):
            return bytes(out)


def decode_protobuf(body: bytes) -> ExportTraceServiceRequest:
    try:
        return ExportTraceServiceRequest.FromString(body)
    except (DecodeError, RuntimeError) as error:  # upb raises DecodeError; invalid UTF-8 in strings too
        raise BadRequest(f"body is not a valid ExportTraceServiceRequest protobuf: {error}") from None


_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _hex_ids_to_base64(obj: object) -> None:
    """OTLP/JSON writes ids as hex, protobuf's JSON mapping expects base64: convert in place."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in _ID_FIELDS and isinstance(value, str):
                try:
                    obj[key] = base64.b64encode(bytes.fromhex(value)).decode("ascii")
                except ValueError:
                    raise BadRequest(f"{key} {value[:64]!r} is not hex") from None
            else:
                _hex_ids_to_base64(value)
    elif isinstance(obj, list):
        for item in obj:
            _hex_ids_to_base64(item)


def decode_json(body: bytes) -> ExportTraceServiceRequest:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as error:  # JSONDecodeError, UnicodeDecodeError, huge ints, deep nesting
        raise BadRequest(f"body is not valid JSON: {str(error)[:200]}") from None
    if not isinstance(document, dict):
        raise BadRequest("OTLP/JSON body must be an object with resourceSpans")
    try:
        _hex_ids_to_base64(document)
    except RecursionError:
        raise BadRequest("OTLP/JSON body is nested too deeply") from None
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except (json_format.ParseError, binascii.Error, ValueError, TypeError, RecursionError) as error:
        raise BadRequest(f"body is not a valid OTLP/JSON trace request: {error}") from None
    return request


def span_count(request: ExportTraceServiceRequest) -> int:
    return sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)


def screen(request: ExportTraceServiceRequest, raw: bytes | None, *, max_attribute_value_bytes: int) -> Screened:
    """Split a request into what may be stored and what is refused, with the reason."""
    check_values = raw is None or len(raw) > max_attribute_value_bytes  # no value can be larger than the body
    reasons: dict[str, int] = {}
    total = rejected = 0
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            keep = []
            spans = scope_spans.spans
            for span in spans:
                total += 1
                reason = _span_problem(span, max_attribute_value_bytes if check_values else 0)
                if reason:
                    rejected += 1
                    reasons[reason] = reasons.get(reason, 0) + 1
                else:
                    keep.append(span)
            if len(keep) != len(spans):
                kept = [s.SerializeToString() for s in keep]
                del spans[:]
                for blob in kept:
                    spans.add().ParseFromString(blob)
    if check_values:
        for resource_spans in request.resource_spans:
            big = _oversized_attribute(resource_spans.resource.attributes, max_attribute_value_bytes)
            if big:
                raise BadRequest(f"resource attribute {big!r} is over {max_attribute_value_bytes} bytes")
    message = "; ".join(f"{count} span(s): {reason}" for reason, count in reasons.items())
    if rejected == 0 and raw is not None:
        return Screened(raw, total, 0)
    if rejected and rejected == total:
        raise BadRequest(f"every span was rejected: {message}")
    return Screened(request.SerializeToString(), total - rejected, rejected, message)


def _span_problem(span: object, max_value_bytes: int) -> str:
    if len(span.trace_id) != 16:  # type: ignore[attr-defined]
        return "trace_id must be 16 bytes"
    if len(span.span_id) != 8:  # type: ignore[attr-defined]
        return "span_id must be 8 bytes"
    if len(span.parent_span_id) not in (0, 8):  # type: ignore[attr-defined]
        return "parent_span_id must be empty or 8 bytes"
    events = span.events  # type: ignore[attr-defined]
    if span.start_time_unix_nano > MAX_TIMESTAMP_NS or (  # type: ignore[attr-defined]
        events and any(event.time_unix_nano > MAX_TIMESTAMP_NS for event in events)
    ):
        return "timestamps after 2262-04-11 cannot be stored (DateTime64(9))"
    if max_value_bytes:
        big = _oversized_attribute(span.attributes, max_value_bytes)  # type: ignore[attr-defined]
        if big:
            return f"attribute value over {max_value_bytes} bytes"
        for item in list(span.events) + list(span.links):  # type: ignore[attr-defined]
            if _oversized_attribute(item.attributes, max_value_bytes):
                return f"event/link attribute value over {max_value_bytes} bytes"
    return ""


def _oversized_attribute(attributes: object, limit: int) -> str | None:
    for kv in attributes:  # type: ignore[attr-defined]
        if kv.value.ByteSize() > limit:
            return kv.key
    return None


def response(rejected: int = 0, message: str = "") -> ExportTraceServiceResponse:
    reply = ExportTraceServiceResponse()
    if rejected or message:
        reply.partial_success.rejected_spans = rejected
        reply.partial_success.error_message = message
    return reply


def encode_json(message: object) -> bytes:
    """A protobuf message as OTLP/JSON (lowerCamelCase keys, ints as numbers)."""
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=False)).encode()  # type: ignore[arg-type]
