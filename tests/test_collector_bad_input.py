"""Bad input against a real `fleetlens collector` process: every kind of unusable OTLP request gets
the right 4xx (or gRPC code) with an OTLP error body — a `google.rpc.Status`, protobuf or JSON as
the request was — and the collector keeps serving: afterwards a valid request is still accepted and
lands in ClickHouse, and `fleetlens_collector_bad_requests_total` counts exactly the rejections.

The generated-payload fuzz (10,000+ requests) is in test_collector_fuzz.py.
"""

from __future__ import annotations

import gzip
import json
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from google.rpc import code_pb2, status_pb2
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from conftest import CollectorProcess, WarehouseProcess, migrated_database, wait_for

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
PROTO_HEADERS = {"content-type": PROTOBUF}
JSON_HEADERS = {"content-type": JSON}
EXPORT = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
MiB = 1024 * 1024
DEFAULT_LIMIT = 16 * MiB  # CollectorSettings.max_request_bytes
ATTRIBUTE_LIMIT = MiB  # CollectorSettings.max_attribute_value_bytes
BIG_LIMIT = 32 * MiB

# Rejections this module has seen answered, by (protocol, reason) as the collector labels them;
# the last test checks the collector's counters against it.
EXPECTED_BAD: Counter[tuple[str, str]] = Counter()
STARTED: list[CollectorProcess] = []


# ------------------------------------------------------------------ fixtures
def _start(warehouse: WarehouseProcess, tmp: Path, database: str,
           env: dict[str, str] | None = None) -> CollectorProcess:
    process = CollectorProcess(migrated_database(warehouse, database), tmp / "collector", env=env or {})
    STARTED.append(process)
    return process.start()


@pytest.fixture(scope="module")
def collector(warehouse: WarehouseProcess,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollectorProcess]:
    """One collector with the default limits (16 MiB requests, 1 MiB attribute values) for the module."""
    process = _start(warehouse, tmp_path_factory.mktemp("bad_input"), "bad_input")
    yield process
    process.stop()


@pytest.fixture(scope="module")
def big_collector(warehouse: WarehouseProcess,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollectorProcess]:
    """A collector taking 32 MiB requests, so a 20 MiB attribute value fits the request but not the 1 MiB
    attribute limit."""
    process = _start(warehouse, tmp_path_factory.mktemp("bad_input_big"), "bad_input_big",
                     {"FLEETLENS_COLLECTOR__MAX_REQUEST_BYTES": str(BIG_LIMIT)})
    yield process
    process.stop()


@pytest.fixture(autouse=True)
def still_serving() -> Iterator[None]:
    """After every test, every collector of this module is alive and healthy."""
    yield
    for process in STARTED:
        if process.process is not None and process.process.returncode is None:  # not stopped by its fixture
            assert process.process.poll() is None, f"collector died: {process.log_path.read_text()[-2000:]}"
            assert httpx.get(process.endpoint + "/health", timeout=10).status_code == 200


# ------------------------------------------------------------------ helpers
def _request(service: str = "bad-input-svc", spans: int = 2, attribute_bytes: int = 0,
             start_ns: int | None = None) -> ExportTraceServiceRequest:
    """A valid request; with `attribute_bytes`, the first span carries one attribute value that long."""
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.add(key="service.name").value.string_value = service
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = "fleetlens.tests.bad_input"
    now = time.time_ns() if start_ns is None else start_ns
    for index in range(spans):
        span = scope_spans.spans.add(trace_id=b"\x0b" * 15 + bytes([index % 256]),
                                     span_id=(index + 1).to_bytes(8, "big"), name=f"span-{index}", kind=2,
                                     start_time_unix_nano=now, end_time_unix_nano=now + 1_000_000)
        span.attributes.add(key="index").value.int_value = index
    if attribute_bytes:
        scope_spans.spans[0].attributes.add(key="huge").value.string_value = "x" * attribute_bytes
    return request


def _json_body(request: ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON: protobuf's JSON mapping with ids as hex."""
    import base64

    from google.protobuf import json_format

    document = json_format.MessageToDict(request)

    def hexify(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("traceId", "spanId", "parentSpanId") and isinstance(value, str):
                    node[key] = base64.b64decode(value).hex()
                else:
                    hexify(value)
        elif isinstance(node, list):
            for item in node:
                hexify(item)

    hexify(document)
    return json.dumps(document).encode()


def _post(collector: CollectorProcess, body: object, headers: dict[str, str], path: str = "/v1/traces",
          timeout: float = 120) -> httpx.Response:
    return httpx.post(collector.endpoint + path, content=body, headers=headers, timeout=timeout)


def _error(reply: httpx.Response, as_json: bool) -> status_pb2.Status:
    """The reply's google.rpc.Status, in the encoding the request used."""
    content_type = reply.headers.get("content-type", "")
    if as_json:
        assert content_type == JSON, (reply.status_code, content_type, reply.content[:200])
        document = reply.json()
        assert set(document) <= {"code", "message", "details"}, document
        return status_pb2.Status(code=document.get("code", 0), message=document.get("message", ""))
    assert content_type == PROTOBUF, (reply.status_code, content_type, reply.content[:200])
    return status_pb2.Status.FromString(reply.content)


def expect_rejected(reply: httpx.Response, status: int, reason: str, *, as_json: bool = False,
                    message: str = "") -> status_pb2.Status:
    """`reply` is `status` with a Status body (INVALID_ARGUMENT for a 400) whose message holds `message`."""
    assert reply.status_code == status, (reply.status_code, reply.content[:300])
    error = _error(reply, as_json)
    assert error.code != code_pb2.OK and error.message, error
    if status == 400:
        assert error.code == code_pb2.INVALID_ARGUMENT, error
    assert message in error.message, error.message
    EXPECTED_BAD[("http", reason)] += 1
    return error


def _accepted(reply: httpx.Response, as_json: bool = False) -> ExportTraceServiceResponse:
    assert reply.status_code == 200, (reply.status_code, reply.content[:300])
    if as_json:
        from google.protobuf import json_format

        assert reply.headers["content-type"] == JSON
        return json_format.Parse(reply.content, ExportTraceServiceResponse())
    assert reply.headers["content-type"] == PROTOBUF
    return ExportTraceServiceResponse.FromString(reply.content)


def _rows(warehouse: WarehouseProcess, collector: CollectorProcess, service: str) -> list[tuple]:
    client = warehouse.client(database=collector.warehouse_url.rsplit("/", 1)[1])
    return client.query("SELECT SpanName, SpanAttributes FROM otel_traces WHERE ServiceName = {s:String} "
                        "ORDER BY SpanName", parameters={"s": service}).result_rows


def _rss(collector: CollectorProcess) -> int:
    assert collector.process is not None
    return psutil.Process(collector.process.pid).memory_info().rss


def gzip_bomb(total_mib: int = 1024) -> bytes:
    """A valid gzip stream of `total_mib` MiB of zeros, about 1 MB long, built without compressing a
    gigabyte: after a full flush every 1 MiB block of zeros deflates to the same bytes."""
    chunk = b"\0" * MiB
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    middle = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    last = deflate.compress(chunk) + deflate.flush()
    crc = 0
    for _ in range(total_mib):
        crc = zlib.crc32(chunk, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    trailer = struct.pack("<II", crc, (total_mib * MiB) & 0xFFFFFFFF)
    return header + first + middle * (total_mib - 2) + last + trailer


def test_gzip_bomb_helper_is_valid_gzip() -> None:
    small = gzip_bomb(4)
    assert gzip.decompress(small) == b"\0" * (4 * MiB)
    assert len(gzip_bomb(1024)) < 1.1 * MiB


# ------------------------------------------------------------------ unusable bodies (400)
def test_truncated_protobuf(collector: CollectorProcess) -> None:
    body = _request(spans=3).SerializeToString()
    expect_rejected(_post(collector, body[: len(body) // 2], PROTO_HEADERS), 400, "invalid",
                    message="not a valid ExportTraceServiceRequest")


@pytest.mark.parametrize("garbage", [
    b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256)) * 4, b"hello, this is not protobuf",
], ids=["ff", "huge-length", "bytes", "text"])
def test_garbage_protobuf(collector: CollectorProcess, garbage: bytes) -> None:
    expect_rejected(_post(collector, garbage, PROTO_HEADERS), 400, "invalid",
                    message="not a valid ExportTraceServiceRequest")


def test_protobuf_of_another_message_type(collector: CollectorProcess) -> None:
    """A bare Span is valid protobuf, but read as a request its first byte names field number 0,
    which no message can have."""
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    span = Span(trace_id=b"\x01" * 16, span_id=b"\x02" * 8, name="not wrapped in a request")
    expect_rejected(_post(collector, span.SerializeToString(), PROTO_HEADERS), 400, "invalid",
                    message="not a valid ExportTraceServiceRequest")


def test_metrics_export_sent_to_the_traces_endpoint(collector: CollectorProcess) -> None:
    """Valid protobuf of another OTLP type: whether it fails to decode or decodes into spans without
    ids, nothing of it is usable, so it is a 400."""
    metrics = ExportMetricsServiceRequest()
    resource_metrics = metrics.resource_metrics.add()
    resource_metrics.resource.attributes.add(key="service.name").value.string_value = "metrics-svc"
    metric = resource_metrics.scope_metrics.add().metrics.add(name="vllm:num_requests_running")
    metric.gauge.data_points.add(as_double=3)
    expect_rejected(_post(collector, metrics.SerializeToString(), PROTO_HEADERS), 400, "invalid")


def test_invalid_utf8_in_a_protobuf_string(collector: CollectorProcess) -> None:
    body = _request(service="utf8-svc").SerializeToString()
    assert body.count(b"utf8-svc") == 1
    bad = body.replace(b"utf8-svc", b"utf8\xff\xfesv")  # same length: only the string's bytes change
    expect_rejected(_post(collector, bad, PROTO_HEADERS), 400, "invalid",
                    message="not a valid ExportTraceServiceRequest")


@pytest.mark.parametrize("body", [b"{", b'{"resourceSpans": [}', b"", b"nul\x00l", b"\xef\xbb\xbf[1,"],
                         ids=["open-brace", "bad-array", "empty", "nul", "bom"])
def test_invalid_json(collector: CollectorProcess, body: bytes) -> None:
    expect_rejected(_post(collector, body, JSON_HEADERS), 400, "invalid", as_json=True, message="JSON")


def test_invalid_utf8_in_json(collector: CollectorProcess) -> None:
    body = _json_body(_request(service="json-utf8-svc")).replace(b"json-utf8-svc", b"json-\xff\xfe-svc")
    expect_rejected(_post(collector, body, JSON_HEADERS), 400, "invalid", as_json=True,
                    message="not valid JSON")


def test_lone_surrogate_escape_in_json(collector: CollectorProcess) -> None:
    """Valid JSON, but "\\ud800" is no Unicode scalar value, so it cannot become a protobuf string."""
    body = _json_body(_request(service="SURROGATE")).replace(b"SURROGATE", b"\\ud800")
    expect_rejected(_post(collector, body, JSON_HEADERS), 400, "invalid", as_json=True)


SPAN_IDS = {"traceId": "5b8efff798038103d269b633813fc60c", "spanId": "eee19b7ec3c1b174"}


def _with_span(**fields: object) -> dict:
    """An OTLP/JSON document with one span: valid ids plus `fields`."""
    return {"resourceSpans": [{"scopeSpans": [{"spans": [{**SPAN_IDS, **fields}]}]}]}


NOT_OTLP = "not a valid OTLP/JSON"


@pytest.mark.parametrize(("document", "message"), [
    pytest.param([], "must be an object", id="list"),
    pytest.param([{"resourceSpans": []}], "must be an object", id="list-of-request"),
    pytest.param("resourceSpans", "must be an object", id="string"),
    pytest.param(42, "must be an object", id="number"),
    pytest.param({"resourceSpans": "nope"}, NOT_OTLP, id="resourcespans-string"),
    pytest.param({"resourceSpans": [{"scopeSpans": {"spans": []}}]}, NOT_OTLP, id="scopespans-object"),
    pytest.param(_with_span(startTimeUnixNano="yesterday"), NOT_OTLP, id="time-word"),
    pytest.param(_with_span(startTimeUnixNano=-1), NOT_OTLP, id="negative-time"),
    pytest.param(_with_span(kind=2**31), NOT_OTLP, id="kind-over-int32"),
    pytest.param(_with_span(attributes=[{"key": "n", "value": {"intValue": str(2**64)}}]), NOT_OTLP,
                 id="int-over-int64"),
    pytest.param(_with_span(attributes=[{"key": "b", "value": {"boolValue": "yes"}}]), NOT_OTLP,
                 id="bool-string"),
    pytest.param(_with_span(name=["a"]), NOT_OTLP, id="name-list"),
    pytest.param(_with_span(traceId="not hex at all!"), "is not hex", id="traceid-not-hex"),
    pytest.param(_with_span(spanId="abc"), "is not hex", id="spanid-odd-hex"),
    pytest.param(_with_span(traceId=12345), NOT_OTLP, id="traceid-number"),
    pytest.param(_with_span(traceId="abcd"), "trace_id must be 16 bytes", id="traceid-short"),
    pytest.param(_with_span(spanId=""), "span_id must be 8 bytes", id="spanid-empty"),
])
def test_valid_json_that_is_not_otlp(collector: CollectorProcess, document: object, message: str) -> None:
    reply = _post(collector, json.dumps(document).encode(), JSON_HEADERS)
    expect_rejected(reply, 400, "invalid", as_json=True, message=message)


def test_spans_without_valid_ids_are_400(collector: CollectorProcess) -> None:
    """A logs export decodes as a traces request (compatible wire types) with one span and no ids:
    every span is rejected, so the request is."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    logs = ExportLogsServiceRequest()
    resource_logs = logs.resource_logs.add()
    resource_logs.scope_logs.add().log_records.add(time_unix_nano=5).body.string_value = "hi"
    expect_rejected(_post(collector, logs.SerializeToString(), PROTO_HEADERS), 400, "invalid",
                    message="every span was rejected")


# ------------------------------------------------------------------ content type / encoding (415)
@pytest.mark.parametrize("content_type", [
    "text/plain", "application/protobuf", "application/grpc", "", "json", "application/x-www-form-urlencoded",
])
def test_wrong_content_type(collector: CollectorProcess, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    reply = _post(collector, _request().SerializeToString(), headers)
    expect_rejected(reply, 415, "content_type", message="content type must be")


@pytest.mark.parametrize("encoding", ["br", "deflate", "zstd", "gzip, br"])
def test_unsupported_content_encoding(collector: CollectorProcess, encoding: str) -> None:
    for headers, as_json, body in ((PROTO_HEADERS, False, _request().SerializeToString()),
                                   (JSON_HEADERS, True, _json_body(_request()))):
        reply = _post(collector, body, {**headers, "content-encoding": encoding})
        expect_rejected(reply, 415, "content_encoding", as_json=as_json, message="not supported")


@pytest.mark.parametrize("body", [
    b"definitely not gzip", gzip.compress(b"\0" * 1000)[:-12], b"\x1f\x8b\x08\x00",
    gzip.compress(b"abc")[:10] + b"\xff" * 20,
], ids=["not-gzip", "truncated", "header-only", "corrupt-deflate"])
def test_bad_gzip(collector: CollectorProcess, body: bytes) -> None:
    reply = _post(collector, body, {**PROTO_HEADERS, "content-encoding": "gzip"})
    expect_rejected(reply, 400, "invalid", message="gzip")


def test_gzip_of_a_valid_request_is_accepted(collector: CollectorProcess) -> None:
    body = gzip.compress(_request(service="gzip-ok").SerializeToString())
    response = _accepted(_post(collector, body, {**PROTO_HEADERS, "content-encoding": "gzip"}))
    assert not response.HasField("partial_success")


# ------------------------------------------------------------------ size limits (413)
def test_gzip_bomb_is_413_without_inflating(collector: CollectorProcess) -> None:
    bomb = gzip_bomb(1024)  # 1 GiB of zeros in ~1 MB
    before = _rss(collector)
    peak = before
    for as_json in (False, True):
        headers = {**(JSON_HEADERS if as_json else PROTO_HEADERS), "content-encoding": "gzip"}
        reply = _post(collector, bomb, headers)
        peak = max(peak, _rss(collector))
        expect_rejected(reply, 413, "too_large", as_json=as_json, message="once decompressed")
    after = _rss(collector)
    print(f"collector RSS around the gzip bombs: before {before / MiB:.0f} MiB, after {after / MiB:.0f} MiB")
    assert after - before < 200 * MiB and peak - before < 200 * MiB


def test_payload_over_the_limit_with_content_length(collector: CollectorProcess) -> None:
    body = b"\0" * (DEFAULT_LIMIT + 1)
    reply = _post(collector, body, PROTO_HEADERS)
    expect_rejected(reply, 413, "too_large", message=f"over {DEFAULT_LIMIT} bytes")
    reply = _post(collector, body, JSON_HEADERS)
    expect_rejected(reply, 413, "too_large", as_json=True, message=f"over {DEFAULT_LIMIT} bytes")


def test_payload_over_the_limit_chunked(collector: CollectorProcess) -> None:
    """No Content-Length: the collector counts while it reads and stops at the limit."""
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        for _ in range(DEFAULT_LIMIT // MiB + 2):
            sent += MiB
            yield b"\0" * MiB

    with httpx.Client(timeout=120) as client:
        request = client.build_request("POST", collector.endpoint + "/v1/traces", content=chunks(),
                                       headers=PROTO_HEADERS)
        assert "content-length" not in request.headers and request.headers["transfer-encoding"] == "chunked"
        reply = client.send(request)
    expect_rejected(reply, 413, "too_large", message=f"over {DEFAULT_LIMIT} bytes")
    assert sent > DEFAULT_LIMIT


def test_chunked_request_under_the_limit_is_accepted(collector: CollectorProcess) -> None:
    body = _request(service="chunked-ok").SerializeToString()
    reply = _post(collector, iter([body[:10], body[10:]]), PROTO_HEADERS)
    _accepted(reply)


# ------------------------------------------------------------------ huge attribute values
def test_20mib_attribute_value_is_413_at_the_default_limit(collector: CollectorProcess) -> None:
    body = _request(attribute_bytes=20 * MiB).SerializeToString()
    expect_rejected(_post(collector, body, PROTO_HEADERS), 413, "too_large")


@pytest.mark.parametrize(("which", "size"), [("collector", 10 * MiB), ("big_collector", 10 * MiB),
                                           ("big_collector", 20 * MiB)],
                         ids=["default-limit-10MiB", "32MiB-limit-10MiB", "32MiB-limit-20MiB"])
def test_attribute_value_over_the_attribute_limit(which: str, size: int, request: pytest.FixtureRequest,
                                                  warehouse: WarehouseProcess) -> None:
    """The request fits `max_request_bytes` but one value is over the 1 MiB attribute limit: alone, the
    span makes the request a 400 naming the limit; next to a good span, the good one is stored and the
    sender is told 1 span was rejected (partial success)."""
    target: CollectorProcess = request.getfixturevalue(which)
    service = f"huge-attr-{which}-{size // MiB}"
    alone = _request(service=service, spans=1, attribute_bytes=size)
    reply = _post(target, alone.SerializeToString(), PROTO_HEADERS)
    assert reply.status_code == 400
    error = _error(reply, as_json=False)
    assert error.code == code_pb2.INVALID_ARGUMENT
    assert f"attribute value over {ATTRIBUTE_LIMIT} bytes" in error.message
    if which == "collector":
        EXPECTED_BAD[("http", "invalid")] += 1

    mixed = _request(service=service, spans=2, attribute_bytes=size)
    response = _accepted(_post(target, mixed.SerializeToString(), PROTO_HEADERS))
    assert response.partial_success.rejected_spans == 1
    assert f"attribute value over {ATTRIBUTE_LIMIT} bytes" in response.partial_success.error_message
    rows = wait_for(lambda: _rows(warehouse, target, service))
    assert [name for name, _ in rows] == ["span-1"]


def test_huge_attribute_value_in_json(collector: CollectorProcess, warehouse: WarehouseProcess) -> None:
    body = _json_body(_request(service="huge-json", spans=1, attribute_bytes=10 * MiB))
    expect_rejected(_post(collector, body, JSON_HEADERS), 400, "invalid", as_json=True,
                    message=f"attribute value over {ATTRIBUTE_LIMIT} bytes")
    mixed = _json_body(_request(service="huge-json", spans=2, attribute_bytes=10 * MiB))
    response = _accepted(_post(collector, mixed, JSON_HEADERS), as_json=True)
    assert response.partial_success.rejected_spans == 1
    assert [name for name, _ in wait_for(lambda: _rows(warehouse, collector, "huge-json"))] == ["span-1"]


def test_huge_event_attribute_is_rejected_per_span(collector: CollectorProcess) -> None:
    request = _request(service="huge-event", spans=2)
    span = request.resource_spans[0].scope_spans[0].spans[0]
    event = span.events.add(name="e", time_unix_nano=time.time_ns())
    event.attributes.add(key="blob").value.bytes_value = b"\1" * (2 * MiB)
    response = _accepted(_post(collector, request.SerializeToString(), PROTO_HEADERS))
    assert response.partial_success.rejected_spans == 1
    assert "event/link attribute value over" in response.partial_success.error_message


def test_huge_resource_attribute_rejects_the_request(collector: CollectorProcess) -> None:
    request = _request(service="huge-resource", spans=2)
    request.resource_spans[0].resource.attributes.add(key="blob").value.string_value = "r" * (2 * MiB)
    expect_rejected(_post(collector, request.SerializeToString(), PROTO_HEADERS), 400, "invalid",
                    message=f"resource attribute 'blob' is over {ATTRIBUTE_LIMIT} bytes")


# ------------------------------------------------------------------ routing
def test_wrong_method_and_unknown_path(collector: CollectorProcess) -> None:
    assert httpx.get(collector.endpoint + "/v1/traces").status_code == 405
    assert httpx.put(collector.endpoint + "/v1/traces", content=b"", headers=PROTO_HEADERS).status_code == 405
    assert _post(collector, b"", PROTO_HEADERS, path="/v1/trace").status_code == 404
    assert _post(collector, b"", PROTO_HEADERS, path="/v1/metrics").status_code == 404
    assert httpx.get(collector.endpoint + "/nope").status_code == 404


def test_empty_protobuf_request_is_an_empty_success(collector: CollectorProcess) -> None:
    """An empty body is a valid (empty) ExportTraceServiceRequest: 200, nothing stored, nothing rejected."""
    response = _accepted(_post(collector, b"", PROTO_HEADERS))
    assert not response.HasField("partial_success")
    assert _accepted(_post(collector, b"{}", JSON_HEADERS), as_json=True) == ExportTraceServiceResponse()


# ------------------------------------------------------------------ gRPC
def _grpc_export(collector: CollectorProcess, raw: bytes) -> bytes:
    with grpc.insecure_channel(f"127.0.0.1:{collector.grpc_port}") as channel:
        call = channel.unary_unary(EXPORT, request_serializer=None, response_deserializer=None)
        return call(raw, timeout=60)


@pytest.mark.parametrize("raw", [b"\xff" * 64, b"\x0a\x05abc", bytes(range(256))],
                         ids=["ff", "truncated", "bytes"])
def test_grpc_garbage_is_invalid_argument(collector: CollectorProcess, raw: bytes) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _grpc_export(collector, raw)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert "not a valid ExportTraceServiceRequest" in caught.value.details()
    EXPECTED_BAD[("grpc", "invalid")] += 1


def test_grpc_over_the_limit_is_resource_exhausted(collector: CollectorProcess) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _grpc_export(collector, _request(attribute_bytes=DEFAULT_LIMIT).SerializeToString())
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value


def test_grpc_huge_attribute_is_partial_success(collector: CollectorProcess,
                                                warehouse: WarehouseProcess) -> None:
    request = _request(service="grpc-huge", spans=2, attribute_bytes=10 * MiB)
    reply = ExportTraceServiceResponse.FromString(_grpc_export(collector, request.SerializeToString()))
    assert reply.partial_success.rejected_spans == 1
    assert [name for name, _ in wait_for(lambda: _rows(warehouse, collector, "grpc-huge"))] == ["span-1"]


# ------------------------------------------------- found by the fuzz test, fixed
@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"resourceSpans":' * 5_000], ids=["arrays", "objects"])
def test_deeply_nested_json_is_400(collector: CollectorProcess, body: bytes) -> None:
    expect_rejected(_post(collector, body, JSON_HEADERS), 400, "invalid", as_json=True)


def test_json_integer_over_4300_digits_is_400(collector: CollectorProcess) -> None:
    body = b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"startTimeUnixNano": ' + b"9" * 5000 + b"}]}]}]}"
    expect_rejected(_post(collector, body, JSON_HEADERS), 400, "invalid", as_json=True)


def test_multi_member_gzip_is_read_whole(collector: CollectorProcess) -> None:
    request = _request(service="multi-member", spans=2)
    second = request.resource_spans.add()
    second.CopyFrom(request.resource_spans[0])
    second.scope_spans[0].spans[0].span_id = b"\x0f" * 8
    second.scope_spans[0].spans[1].span_id = b"\x0e" * 8
    first_part = ExportTraceServiceRequest()
    first_part.resource_spans.add().CopyFrom(request.resource_spans[0])
    second_part = ExportTraceServiceRequest()
    second_part.resource_spans.add().CopyFrom(second)
    # protobuf messages concatenate: the two parts together are the whole request
    assert first_part.SerializeToString() + second_part.SerializeToString() == request.SerializeToString()
    body = gzip.compress(first_part.SerializeToString()) + gzip.compress(second_part.SerializeToString())
    assert gzip.decompress(body) == request.SerializeToString()

    def received() -> float:
        return collector.metrics().get('fleetlens_collector_received_spans_total{protocol="http"}', 0.0)

    before = received()
    _accepted(_post(collector, body, {**PROTO_HEADERS, "content-encoding": "gzip"}))
    assert received() - before == 4


def test_spans_spread_over_more_than_100_days_all_land(collector: CollectorProcess,
                                                       warehouse: WarehouseProcess) -> None:
    request = _request(service="many-days", spans=0)
    spans = request.resource_spans[0].scope_spans[0].spans
    now = time.time_ns()
    for day in range(101):
        start = now - day * 86_400 * 10**9
        spans.add(trace_id=b"\x0d" * 16, span_id=(day + 1).to_bytes(8, "big"), name=f"day-{day}",
                  start_time_unix_nano=start, end_time_unix_nano=start + 1000)
    def written() -> float:
        return collector.metrics()["fleetlens_collector_written_spans_total"]

    before = written()
    _accepted(_post(collector, request.SerializeToString(), PROTO_HEADERS))
    wait_for(lambda: written() >= before + 101, timeout_s=20)
    assert len(_rows(warehouse, collector, "many-days")) == 101


# ------------------------------------------------------------------ and it keeps serving
def test_still_serving_and_counted(collector: CollectorProcess, warehouse: WarehouseProcess) -> None:
    """After everything above, valid requests over every protocol are accepted and land, and the
    collector's bad-request counters hold exactly the rejections it answered."""
    assert collector.process is not None and collector.process.poll() is None
    assert httpx.get(collector.endpoint + "/health").json() == {"status": "ok"}
    _accepted(_post(collector, _request(service="after-http").SerializeToString(), PROTO_HEADERS))
    _accepted(_post(collector, _json_body(_request(service="after-json")), JSON_HEADERS), as_json=True)
    _accepted(_post(collector, gzip.compress(_json_body(_request(service="after-gzip"))),
                    {**JSON_HEADERS, "content-encoding": "gzip"}), as_json=True)
    grpc_reply = _grpc_export(collector, _request(service="after-grpc").SerializeToString())
    assert not ExportTraceServiceResponse.FromString(grpc_reply).HasField("partial_success")
    for service in ("after-http", "after-json", "after-gzip", "after-grpc"):
        rows = wait_for(lambda: _rows(warehouse, collector, service))  # noqa: B023
        assert [name for name, _ in rows] == ["span-0", "span-1"], service

    metrics = collector.metrics()
    counted = {key: value for key, value in metrics.items()
               if key.startswith("fleetlens_collector_bad_requests_total{") and value}
    expected = {
        f'fleetlens_collector_bad_requests_total{{protocol="{protocol}",reason="{reason}"}}': float(count)
        for (protocol, reason), count in EXPECTED_BAD.items()
    }
    print("bad requests counted:", counted)
    assert counted == expected
    refused = [key for key, value in metrics.items()
               if key.startswith("fleetlens_collector_refused_requests") and value]
    assert not refused
