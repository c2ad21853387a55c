"""Spans from the real OpenTelemetry SDK, encoded as OTLP protobuf, become exporter-identical rows."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from fleetlens.collector.mapping import COLUMNS, format_double, map_request, value_as_string
from fleetlens.schema import RenderOptions, migrate


def sdk_request() -> tuple[ExportTraceServiceRequest, list]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "gateway", "deployment.environment": "test",
                                                        "replicas": 3}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("fleetlens.serving", "0.1.0")
    linked = SpanContext(0x5B8AA5A2D2C872E8321CF37308D69DF2, 0x051581BF3CB55C13, is_remote=True,
                         trace_flags=TraceFlags(1))
    with tracer.start_as_current_span("POST /v1/chat/completions", kind=SpanKind.SERVER,
                                      attributes={"http.status_code": 200, "fleetlens.customer": "acme"}) as root:
        with tracer.start_as_current_span("upstream", kind=SpanKind.CLIENT, links=[Link(linked, {"retry": True})],
                                          attributes={"gen_ai.usage.input_tokens": 17, "ratio": 0.1,
                                                      "tiny": 1e-7, "flag": False, "tags": ["a", "b"],
                                                      "scores": [1.5, 2.0]}) as child:
            child.add_event("first_chunk", {"ttft_s": 0.25})
            child.set_status(Status(StatusCode.ERROR, "upstream timeout"))
        root.set_status(Status(StatusCode.OK))
    provider.shutdown()
    spans = exporter.get_finished_spans()
    wire = encode_spans(spans).SerializeToString()  # what an OTLP exporter puts on the wire
    request = ExportTraceServiceRequest()
    request.ParseFromString(wire)
    return request, list(spans)


def test_sdk_spans_map_field_by_field():
    request, spans = sdk_request()
    rows = map_request(request)
    assert len(rows) == 2
    by_name = {name: i for i, name in enumerate(rows.columns["SpanName"])}
    child_sdk = next(s for s in spans if s.name == "upstream")
    root_sdk = next(s for s in spans if s.name != "upstream")
    c, i, r = rows.columns, by_name["upstream"], by_name["POST /v1/chat/completions"]
    assert c["Timestamp"][i] == child_sdk.start_time
    assert c["Duration"][i] == child_sdk.end_time - child_sdk.start_time
    assert c["TraceId"][i] == trace.format_trace_id(child_sdk.context.trace_id)
    assert c["SpanId"][i] == trace.format_span_id(child_sdk.context.span_id)
    assert c["ParentSpanId"][i] == trace.format_span_id(root_sdk.context.span_id)
    assert c["ParentSpanId"][r] == ""  # root: no parent -> empty string, not zeros
    assert c["SpanKind"][i] == "Client" and c["SpanKind"][r] == "Server"
    assert c["StatusCode"][i] == "Error" and c["StatusMessage"][i] == "upstream timeout"
    assert c["StatusCode"][r] == "Ok"
    assert "otel.scope.name" not in c["SpanAttributes"][i]
    assert c["ServiceName"][i] == "gateway"
    assert c["ResourceAttributes"][i]["deployment.environment"] == "test"
    assert c["ResourceAttributes"][i]["replicas"] == "3"
    assert c["ScopeName"][i] == "fleetlens.serving" and c["ScopeVersion"][i] == "0.1.0"
    assert c["SpanAttributes"][i] == {"gen_ai.usage.input_tokens": "17", "ratio": "0.1", "tiny": "1e-7",
                                      "flag": "false", "tags": '["a","b"]', "scores": "[1.5,2]"}
    assert c["Events.Name"][i] == ["first_chunk"] and c["Events.Attributes"][i] == [{"ttft_s": "0.25"}]
    assert c["Events.Timestamp"][i] == [child_sdk.events[0].timestamp]
    assert c["Links.TraceId"][i] == ["5b8aa5a2d2c872e8321cf37308d69df2"]
    assert c["Links.SpanId"][i] == ["051581bf3cb55c13"]
    assert c["Links.Attributes"][i] == [{"retry": "true"}]
    assert list(rows.columns) == list(COLUMNS)


@pytest.mark.parametrize("value,expected", [
    (1.0, "1"), (0.1, "0.1"), (-2.5, "-2.5"), (1e-7, "1e-7"), (1.5e-7, "1.5e-7"), (1e21, "1e+21"),
    (1e20, "100000000000000000000"), (123456789.125, "123456789.125"), (0.000001, "0.000001"), (0.0, "0"),
])
def test_doubles_render_like_go(value, expected):
    assert format_double(value) == expected


def test_end_before_start_wraps_like_the_exporter():
    request, _ = sdk_request()
    span = request.resource_spans[0].scope_spans[0].spans[0]
    span.end_time_unix_nano = span.start_time_unix_nano - 5
    assert map_request(request).columns["Duration"][0] == 2**64 - 5


def test_complex_values_render_as_go_json():
    kv = AnyValue(kvlist_value=KeyValueList(values=[
        KeyValue(key="z", value=AnyValue(int_value=1)),
        KeyValue(key="a", value=AnyValue(string_value="<x & y>")),
        KeyValue(key="m", value=AnyValue(array_value=ArrayValue(values=[AnyValue(double_value=2.0),
                                                                         AnyValue(bool_value=True)]))),
    ]))
    assert value_as_string(kv) == '{"a":"<x & y>","m":[2,true],"z":1}'
    assert value_as_string(AnyValue(bytes_value=b"\x00\xff")) == "AP8="
    assert value_as_string(AnyValue()) == ""


def test_mapped_rows_insert_into_otel_traces(warehouse):
    request, _ = sdk_request()
    rows = map_request(request)
    client = warehouse.client()
    migrate(client, RenderOptions(database="mapping"))
    client.insert("otel_traces", rows.as_lists(), column_names=list(COLUMNS), database="mapping",
                  column_oriented=True)
    got = client.query("SELECT SpanName, SpanKind, SpanAttributes['ratio'], length(Events.Name), "
                       "toUnixTimestamp64Nano(Timestamp) FROM mapping.otel_traces ORDER BY SpanName").result_rows
    assert [g[:4] for g in got] == [("POST /v1/chat/completions", "Server", "", 0),
                                    ("upstream", "Client", "0.1", 1)]
    assert sorted(g[4] for g in got) == sorted(rows.columns["Timestamp"])
    keys = client.query("SELECT mapKeys(SpanAttributes) FROM mapping.otel_traces WHERE SpanName = 'upstream'"
                        ).result_rows[0][0]
    assert keys == sorted(keys) and len(keys) == 6  # stored in the exporter's (sorted) order
