"""The gateway's lean tracer (serving/fast_tracer.py) and wire encoder (serving/otlp_wire.py) against
the OpenTelemetry SDK: the same program traced by both gives the same spans, and the same spans
encoded by both give the same OTLP messages (decoded with the protobuf classes and compared)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, NonRecordingSpan, SpanKind, Status, StatusCode

from conftest import RecordedSpans
from fleetlens.serving.fast_tracer import RecordedSpan
from fleetlens.serving.otlp_wire import OtlpSpanEncoder

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
LONG_TEXT = "a prompt, recorded only when record_content is on. " * 20  # longer than what the encoder caches


def sdk_tracing() -> tuple[trace.TracerProvider, Callable[[], list[Any]]]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "fleetlens-gateway"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    return provider, lambda: list(memory.get_finished_spans())


def fast_tracing() -> tuple[trace.TracerProvider, Callable[[], list[Any]]]:
    recorded = RecordedSpans()
    return recorded.provider, lambda: list(recorded.get_finished_spans())


def a_request(provider: trace.TracerProvider, headers: dict[str, str] | None = None) -> dict[str, str]:
    """What the gateway does with a request, with every kind of value and status it uses (and some
    it does not yet); returns the headers it would send upstream."""
    tracer = provider.get_tracer("fleetlens.gateway", "1.0")
    root = tracer.start_span("POST /v1/chat/completions", context=propagate.extract(headers or {}),
                             kind=SpanKind.SERVER, attributes={"gen_ai.operation.name": "chat"})
    ctx = trace.set_span_in_context(root)
    with tracer.start_as_current_span("auth", context=ctx, attributes={"fleetlens.stage": "auth"}) as auth:
        auth.set_attributes({"fleetlens.customer": "acme", "fleetlens.stream": True, "n": 0, "neg": -42,
                             "big": 2**62, "ratio": 0.25, "ids": ["d1", "d2"], "flags": [True, False],
                             "counts": [1, 2, 3], "scores": [0.5, 1.5], "raw": b"\x00\xff", "empty": "",
                             "text": LONG_TEXT, "none": None})
    with pytest.raises(ValueError):
        with tracer.start_as_current_span("rate_limit", context=ctx):
            raise ValueError("over the limit")
    upstream = tracer.start_span("chat small", context=ctx, kind=SpanKind.CLIENT,
                                 links=[Link(root.get_span_context(), {"why": "fallback"})])
    sent: dict[str, str] = {}
    propagate.inject(sent, context=trace.set_span_in_context(upstream))
    upstream.add_event("first_chunk", {"bytes": 12})
    upstream.set_status(Status(StatusCode.OK))
    upstream.set_status(Status(StatusCode.ERROR, "too late: OK is final"))
    upstream.end()
    upstream.set_attribute("after.end", "ignored")
    root.update_name("POST /v1/chat/completions")
    root.set_status(StatusCode.UNSET)  # ignored
    root.set_status(Status(StatusCode.ERROR, "answered 502"))
    root.end()
    root.end()  # a second end changes nothing
    return sent


def comparable(spans: list[Any]) -> list[tuple]:
    """Spans as ids-free tuples: parents as positions in the list (or 'remote <id>')."""
    position = {span.context.span_id: index for index, span in enumerate(spans)}

    def parent(span: Any) -> Any:
        if span.parent is None:
            return None
        if span.parent.is_remote:
            return f"remote {span.parent.span_id:016x}"
        return position[span.parent.span_id]

    def events(span: Any) -> list[tuple]:
        return [(event.name, {k: v for k, v in event.attributes.items() if k != "exception.stacktrace"},
                 "exception.stacktrace" in event.attributes) for event in span.events]

    return [(span.name, span.kind, parent(span), dict(span.attributes), span.status.status_code,
             span.status.description, events(span), len(span.links), span.context.trace_state.to_header()
             if span.context.trace_state else "", span.instrumentation_scope.name)
            for span in spans]


@pytest.mark.parametrize("headers", [{}, {"traceparent": TRACEPARENT, "tracestate": "vendor=1,other=x"}])
def test_the_fast_tracer_records_what_the_sdk_records(headers: dict[str, str]) -> None:
    sdk_provider, sdk_spans = sdk_tracing()
    fast_provider, fast_spans = fast_tracing()
    sdk_sent = a_request(sdk_provider, headers)
    fast_sent = a_request(fast_provider, headers)
    assert comparable(fast_spans()) == comparable(sdk_spans())
    spans = fast_spans()
    assert all(isinstance(span, RecordedSpan) for span in spans)
    assert len({span.context.trace_id for span in spans}) == 1  # one trace
    if headers:
        assert spans[0].context.trace_id == 0x0AF7651916CD43DD8448EB211C80319C  # the caller's trace
        assert fast_sent["tracestate"] == sdk_sent["tracestate"] == "vendor=1,other=x"
    upstream = next(span for span in spans if span.name == "chat small")
    assert fast_sent["traceparent"] == f"00-{upstream.context.trace_id:032x}-{upstream.context.span_id:016x}-01"
    assert "after.end" not in upstream.attributes


def test_a_caller_that_does_not_sample_gets_no_spans_but_its_trace_goes_upstream() -> None:
    provider, spans = fast_tracing()
    tracer = provider.get_tracer("fleetlens.gateway")
    root = tracer.start_span("POST /v1/chat/completions", context=propagate.extract({"traceparent": UNSAMPLED}))
    assert isinstance(root, NonRecordingSpan) and not root.is_recording()
    child = tracer.start_span("chat small", context=trace.set_span_in_context(root))
    sent: dict[str, str] = {}
    propagate.inject(sent, context=trace.set_span_in_context(child))
    child.end()
    root.end()
    assert spans() == []
    assert sent["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-")
    assert sent["traceparent"].endswith("-00")


def test_a_list_attribute_is_copied_when_set() -> None:
    provider, spans = fast_tracing()
    ids = ["d1"]
    span = provider.get_tracer("t").start_span("retrieval", attributes={"ids": ids})
    ids.append("d2")
    span.end()
    assert spans()[0].attributes["ids"] == ("d1",)


def decoded(body: bytes) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(body)


@pytest.mark.parametrize("headers", [{}, {"traceparent": TRACEPARENT, "tracestate": "vendor=1,other=x"}])
def test_the_wire_encoder_writes_the_messages_the_sdk_encoder_writes(headers: dict[str, str]) -> None:
    provider, spans = sdk_tracing()
    a_request(provider, headers)
    ended = spans()
    resource = ended[0].resource
    encoder = OtlpSpanEncoder(resource.attributes)
    ours = encoder.encode(ended)
    message = decoded(ours)
    links = [link for span in message.resource_spans[0].scope_spans[0].spans for link in span.links]
    assert [link.trace_state for link in links] == ["vendor=1,other=x" if headers else ""]
    for link in links:
        link.trace_state = ""  # the spec's Link has it; the SDK's encoder leaves it out
    assert message == decoded(encode_spans(ended).SerializeToString())
    assert encoder.encode(ended) == ours  # the second time from the cache: the same bytes
    (auth,) = [span for span in decoded(ours).resource_spans[0].scope_spans[0].spans if span.name == "auth"]
    values = {kv.key: kv.value for kv in auth.attributes}
    assert values["neg"].int_value == -42 and values["big"].int_value == 2**62
    assert values["empty"].HasField("string_value") and values["n"].HasField("int_value")  # set, though default
    assert values["text"].string_value == LONG_TEXT and values["raw"].bytes_value == b"\x00\xff"
    assert not values["none"].ListFields()  # None: an empty value, as the SDK writes it


def test_the_fast_tracers_spans_encode_as_the_sdks_do() -> None:
    """The production path end to end: FastTracer spans through the wire encoder decode to the same
    spans as the SDK's spans through its encoder (ids and times aside)."""
    sdk_provider, sdk_spans = sdk_tracing()
    fast_provider, fast_spans = fast_tracing()
    a_request(sdk_provider, {"traceparent": TRACEPARENT})
    a_request(fast_provider, {"traceparent": TRACEPARENT})
    resource = sdk_spans()[0].resource

    def normalized(body: bytes) -> list[Any]:
        message = decoded(body)
        out = []
        for span in message.resource_spans[0].scope_spans[0].spans:
            span.span_id = span.parent_span_id = b""
            span.start_time_unix_nano = span.end_time_unix_nano = 0
            for event in span.events:
                event.time_unix_nano = 0
                kept = [kv for kv in event.attributes if kv.key != "exception.stacktrace"]
                del event.attributes[:]
                event.attributes.extend(kept)
            for link in span.links:
                link.span_id = b""
                link.trace_state = ""
            out.append(span)
        assert message.resource_spans[0].resource == decoded(encode_spans(sdk_spans()).SerializeToString()).resource_spans[0].resource
        return out

    assert normalized(OtlpSpanEncoder(resource.attributes).encode(fast_spans())) == \
        normalized(encode_spans(sdk_spans()).SerializeToString())


def test_spans_of_two_scopes_go_out_under_their_scopes() -> None:
    provider, spans = fast_tracing()
    for name in ("fleetlens.gateway", "fleetlens.retrieval", "fleetlens.gateway"):
        provider.get_tracer(name).start_span(f"from {name}").end()
    message = decoded(OtlpSpanEncoder({"service.name": "gw"}).encode(spans()))
    scopes = [(scope.scope.name, [span.name for span in scope.spans]) for scope in message.resource_spans[0].scope_spans]
    assert scopes == [("fleetlens.gateway", ["from fleetlens.gateway"]),
                      ("fleetlens.retrieval", ["from fleetlens.retrieval"]),
                      ("fleetlens.gateway", ["from fleetlens.gateway"])]


def test_a_value_the_wire_format_cannot_hold_is_refused() -> None:
    provider, spans = fast_tracing()
    provider.get_tracer("t").start_span("x", attributes={"huge": 2**64}).end()
    with pytest.raises(ValueError, match="int64"):
        OtlpSpanEncoder({}).encode(spans())
