"""Spans from the official OpenTelemetry Python SDK + OTLP exporters (gRPC and HTTP/protobuf) and
OTLP/JSON land in `otel_traces` through a real `fleetlens collector` process, with every field as
the ClickHouse exporter writes it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from fleetlens.collector.mapping import COLUMNS, map_request

from conftest import CollectorProcess, WarehouseProcess, child_env, migrated_database, wait_for


@pytest.fixture
def collector(warehouse: WarehouseProcess, start_collector, request: pytest.FixtureRequest) -> Iterator[CollectorProcess]:
    url = migrated_database(warehouse, f"otlp_{request.node.name.replace('[', '_').replace(']', '').replace('-', '_')}")
    yield start_collector(url)


def _emit_spans(exporter: object, service: str) -> list:
    """A small trace exercising every column: kinds, status, events, links, typed attributes."""
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": service, "deployment.environment": "test",
                                                        "host.cpus": 2}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("fleetlens.tests", "1.2.3")
    linked = SpanContext(trace_id=0x0AF7651916CD43DD8448EB211C80319C, span_id=0xB7AD6B7169203331, is_remote=True,
                         trace_flags=TraceFlags(1))
    with tracer.start_as_current_span("POST /v1/chat/completions", kind=SpanKind.SERVER, attributes={
        "fleetlens.customer": "acme", "gen_ai.usage.input_tokens": 812, "fleetlens.stream": True,
        "gen_ai.latency.e2e": 0.1, "ratio": 1e-7, "tags": ["a", "b"], "ints": [1, 2, 3], "z.last": "<&>",
    }) as root:
        root.add_event("first_token", {"gen_ai.latency.time_to_first_token": 0.25})
        with tracer.start_as_current_span("chat llama", kind=SpanKind.CLIENT, links=[Link(linked, {"why": "retry"})]):
            pass
        with tracer.start_as_current_span("postprocess") as post:
            post.set_status(Status(StatusCode.ERROR, "schema violation"))
    provider.shutdown()
    return list(memory.get_finished_spans())


def _rows(client, service: str) -> list[dict]:
    result = client.query(f"SELECT * FROM otel_traces WHERE ServiceName = '{service}' ORDER BY SpanId")
    return [dict(zip(result.column_names, row)) for row in result.result_rows]


def _expected(spans: list) -> list[dict]:
    cols = map_request(encode_spans(spans)).columns
    rows = [{name: cols[name][i] for name in COLUMNS} for i in range(len(cols["SpanId"]))]
    return sorted(rows, key=lambda r: r["SpanId"])


def _comparable(row: dict) -> dict:
    out = dict(row)
    ts = out.pop("Timestamp")
    out["Timestamp_ns"] = ts if isinstance(ts, int) else int(ts.timestamp()) * 10**9 + ts.microsecond * 1000
    out["Events.Timestamp"] = [e if isinstance(e, int) else int(e.timestamp()) * 10**9 + e.microsecond * 1000
                               for e in out["Events.Timestamp"]]
    out["Timestamp_ns"] -= out["Timestamp_ns"] % 1000  # datetime has microseconds; compare at that precision
    out["Events.Timestamp"] = [e - e % 1000 for e in out["Events.Timestamp"]]
    return out


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_official_exporter_spans_land_with_every_field(collector: CollectorProcess, warehouse: WarehouseProcess,
                                                       protocol: str) -> None:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        exporter = GrpcExporter(endpoint=f"http://127.0.0.1:{collector.grpc_port}", insecure=True)
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        exporter = HttpExporter(endpoint=f"{collector.endpoint}/v1/traces")
    service = f"svc-{protocol}"
    spans = _emit_spans(exporter, service)
    client = warehouse.client(database=collector.warehouse_url.rsplit("/", 1)[1])
    rows = wait_for(lambda: (r := _rows(client, service)) and len(r) == 3 and r)

    assert [_comparable(r) for r in rows] == [_comparable(r) for r in _expected(spans)]
    by_name = {r["SpanName"]: r for r in rows}
    root, upstream, post = by_name["POST /v1/chat/completions"], by_name["chat llama"], by_name["postprocess"]
    assert root["SpanKind"] == "Server" and upstream["SpanKind"] == "Client" and post["SpanKind"] == "Internal"
    assert post["StatusCode"] == "Error" and post["StatusMessage"] == "schema violation"
    assert root["StatusCode"] == "Unset"
    assert root["ParentSpanId"] == "" and upstream["ParentSpanId"] == root["SpanId"] == post["ParentSpanId"]
    assert len(root["TraceId"]) == 32 and len(root["SpanId"]) == 16
    assert root["ServiceName"] == service and root["ScopeName"] == "fleetlens.tests" and root["ScopeVersion"] == "1.2.3"
    assert root["ResourceAttributes"]["deployment.environment"] == "test"
    assert root["ResourceAttributes"]["host.cpus"] == "2"
    assert root["SpanAttributes"] == {
        "fleetlens.customer": "acme", "fleetlens.stream": "true", "gen_ai.latency.e2e": "0.1",
        "gen_ai.usage.input_tokens": "812", "ints": "[1,2,3]", "ratio": "1e-7", "tags": '["a","b"]', "z.last": "<&>",
    }
    assert list(root["SpanAttributes"]) == sorted(root["SpanAttributes"])
    assert root["Events.Name"] == ["first_token"]
    assert root["Events.Attributes"] == [{"gen_ai.latency.time_to_first_token": "0.25"}]
    assert upstream["Links.TraceId"] == ["0af7651916cd43dd8448eb211c80319c"]
    assert upstream["Links.SpanId"] == ["b7ad6b7169203331"]
    assert upstream["Links.Attributes"] == [{"why": "retry"}]
    assert root["Duration"] > 0
    metrics = collector.metrics()
    assert metrics[f'fleetlens_collector_accepted_spans_total{{protocol="{protocol}"}}'] == 3


def test_otlp_json_with_hex_ids_and_gzip(collector: CollectorProcess, warehouse: WarehouseProcess) -> None:
    import gzip

    body = {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "json-svc"}}]},
        "scopeSpans": [{"scope": {"name": "curl"}, "spans": [{
            "traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174",
            "parentSpanId": "eee19b7ec3c1b173", "name": "I'm a server span", "kind": 2,
            "startTimeUnixNano": "1544712660000000000", "endTimeUnixNano": "1544712661000000000",
            "attributes": [{"key": "my.span.attr", "value": {"stringValue": "some value"}},
                           {"key": "n", "value": {"intValue": "42"}}],
            "status": {"code": 2, "message": "boom"},
        }]}],
    }]}
    reply = httpx.post(f"{collector.endpoint}/v1/traces", content=gzip.compress(json.dumps(body).encode()),
                       headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {}
    client = warehouse.client(database=collector.warehouse_url.rsplit("/", 1)[1])
    (row,) = wait_for(lambda: _rows(client, "json-svc"))
    assert row["TraceId"] == "5b8efff798038103d269b633813fc60c" and row["SpanId"] == "eee19b7ec3c1b174"
    assert row["ParentSpanId"] == "eee19b7ec3c1b173"
    assert row["SpanKind"] == "Server" and row["StatusCode"] == "Error" and row["StatusMessage"] == "boom"
    assert row["Duration"] == 1_000_000_000
    assert row["SpanAttributes"] == {"my.span.attr": "some value", "n": "42"}
    assert row["Timestamp"].year == 2018


def test_partial_success_reports_invalid_spans(collector: CollectorProcess, warehouse: WarehouseProcess) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
        ExportTraceServiceResponse,
    )

    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.add(key="service.name").value.string_value = "partial-svc"
    spans = resource_spans.scope_spans.add().spans
    spans.add(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="good", start_time_unix_nano=time.time_ns(),
              end_time_unix_nano=time.time_ns())
    spans.add(trace_id=b"\x01" * 15, span_id=b"\x03" * 8, name="short trace id")
    reply = httpx.post(f"{collector.endpoint}/v1/traces", content=request.SerializeToString(),
                       headers={"content-type": "application/x-protobuf"})
    assert reply.status_code == 200
    decoded = ExportTraceServiceResponse.FromString(reply.content)
    assert decoded.partial_success.rejected_spans == 1
    assert "trace_id must be 16 bytes" in decoded.partial_success.error_message
    client = warehouse.client(database=collector.warehouse_url.rsplit("/", 1)[1])
    rows = wait_for(lambda: _rows(client, "partial-svc"))
    assert [r["SpanName"] for r in rows] == ["good"]
    assert collector.metrics()['fleetlens_collector_rejected_spans_total{protocol="http"}'] == 1


def test_status_shows_collector_counters(collector: CollectorProcess) -> None:
    import subprocess
    import sys

    request_spans = _emit_spans(_http_exporter(collector), "status-svc")
    assert len(request_spans) == 3
    wait_for(lambda: collector.metrics().get("fleetlens_collector_written_spans_total") == 3)
    env = child_env({"FLEETLENS_WAREHOUSE_URL": collector.warehouse_url,
                     "FLEETLENS_COLLECTOR__HTTP_PORT": str(collector.http_port), "COLUMNS": "200"})
    out = subprocess.run([sys.executable, "-m", "fleetlens", "status"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip()
             for line in out.stdout.splitlines() if line.count("│") == 3}
    assert lines["accepted_spans"] == "3" and lines["written_spans"] == "3"
    assert lines["dropped_spans"] == "0" and lines["warehouse_up"] == "1"


def _http_exporter(collector: CollectorProcess):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter(endpoint=f"{collector.endpoint}/v1/traces")
