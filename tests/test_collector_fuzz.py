"""Generated bad (and good) OTLP input, with hypothesis.

- Unit level: `collector.otlp`'s `gunzip`, `decode_protobuf`, `decode_json` and `screen`, given any bytes,
  return or raise `BadRequest` / `TooLarge` and nothing else; whatever gets through decoding and
  screening is mapped to rows (`mapping.map_request`) and encoded for the insert
  (`writer.json_columns`) without an exception — an exception there would be retried by the writer
  forever.
- Process level: more than 10,000 generated payloads (random bytes, mutations of valid requests,
  structurally generated requests as protobuf and OTLP/JSON, random JSON, random content types and
  encodings, oversized and gzip-bomb bodies) are sent to one real `fleetlens collector` over
  OTLP/HTTP; every answer is one of 200/400/413/415/429/503 with a well-formed OTLP body, never a
  500 or a dropped connection, and afterwards the collector is alive, healthy, has not grown its
  memory without bound, and still stores a valid request. A smaller run does the same over gRPC.

Two inputs are left to their own tests in test_collector_bad_input.py instead of being generated
here (they take long to build): nesting deeper than Python's recursion limit and integers over 4,300
digits — both once answered 500, now 400.
"""

from __future__ import annotations

import base64
import gzip
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import psutil
import pytest
from google.protobuf import json_format
from google.rpc import status_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from fleetlens.collector import otlp
from fleetlens.collector.mapping import COLUMNS, map_request
from fleetlens.collector.writer import json_columns

from conftest import CollectorProcess, WarehouseProcess, migrated_database, wait_for

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
# Small limits for the fuzzed collector, so that generated input reaches the 413 and screening paths.
FUZZ_MAX_REQUEST_BYTES = 64 * 1024
FUZZ_MAX_ATTRIBUTE_BYTES = 512
FUZZ_PAYLOADS = 10_000
FUZZ_BATCH = 20
FUZZ_EXAMPLES = 510  # × FUZZ_BATCH payloads; hypothesis may discard some examples: what was sent is counted
ALLOWED = {200, 400, 413, 415, 429, 503}
NOW_NS = 1_767_225_600 * 10**9  # 2026-01-01: generated spans stay in a few daily partitions
U64 = 2**64 - 1

UNIT = settings(max_examples=400, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck))


# ======================================================================== strategies
texts = st.text(max_size=24)
keys = st.one_of(
    texts, st.sampled_from(["service.name", "traceId", "spanId", "", "gen_ai.usage.input_tokens"]),
)
int64s = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-(2**63), 2**63 - 1, 0, -1]))
timestamps = st.one_of(st.integers(NOW_NS - 3_600 * 10**9, NOW_NS + 3_600 * 10**9),
                       st.sampled_from([0, 1, NOW_NS, 2**63 - 1, 2**63, U64]))
_id16, _id8 = st.binary(min_size=16, max_size=16), st.binary(min_size=8, max_size=8)
trace_ids = st.one_of(_id16, _id16, _id16, st.binary(max_size=33))  # mostly valid, so spans get through
span_ids = st.one_of(_id8, _id8, _id8, st.binary(max_size=17))
parent_ids = st.one_of(st.just(b""), _id8, _id8, st.binary(max_size=17))


def _nested_array(depth: int) -> AnyValue:
    """Arrays in arrays, built in place: protobuf's constructors and append() copy by parsing, which
    stops at depth 100, while CopyFrom and add() do not."""
    root = AnyValue()
    value = root
    for _ in range(depth):
        value = value.array_value.values.add()
    value.string_value = "leaf"
    return root


def _array(values: list[AnyValue]) -> AnyValue:
    out = AnyValue()
    out.array_value.SetInParent()
    for value in values:
        out.array_value.values.add().CopyFrom(value)
    return out


def _kvlist(items: list[tuple[str, AnyValue]]) -> AnyValue:
    out = AnyValue()
    out.kvlist_value.SetInParent()
    for key, value in items:
        out.kvlist_value.values.add(key=key).value.CopyFrom(value)
    return out


def _set_attributes(target: object, items: list[tuple[str, AnyValue]]) -> None:
    for key, value in items:
        target.add(key=key).value.CopyFrom(value)  # type: ignore[attr-defined]


scalar_values = st.one_of(
    texts.map(lambda s: AnyValue(string_value=s)),
    int64s.map(lambda i: AnyValue(int_value=i)),
    st.floats().map(lambda f: AnyValue(double_value=f)),  # NaN, ±inf, -0.0, subnormals
    st.booleans().map(lambda b: AnyValue(bool_value=b)),
    st.binary(max_size=40).map(lambda b: AnyValue(bytes_value=b)),
    st.just(AnyValue()),
    st.integers(0, 2 * FUZZ_MAX_ATTRIBUTE_BYTES).map(lambda n: AnyValue(string_value="v" * n)),
    st.integers(40, 55).map(_nested_array),  # the request crosses the parsers' depth limit of 100 here
)
any_values = st.recursive(scalar_values, lambda children: st.one_of(
    st.lists(children, max_size=3).map(_array),
    st.lists(st.tuples(keys, children), max_size=3).map(_kvlist),
), max_leaves=8)
attributes = st.lists(st.tuples(keys, any_values), max_size=3)


@st.composite
def spans(draw: st.DrawFn) -> Span:
    span = Span(
        trace_id=draw(trace_ids), span_id=draw(span_ids), parent_span_id=draw(parent_ids),
        trace_state=draw(texts), name=draw(texts),
        kind=draw(st.one_of(st.integers(0, 6), st.sampled_from([-1, 2**31 - 1, -(2**31)]))),
        start_time_unix_nano=draw(timestamps), end_time_unix_nano=draw(timestamps),
        dropped_attributes_count=draw(st.integers(0, 2**32 - 1)), flags=draw(st.integers(0, 2**32 - 1)),
        status=Status(code=draw(st.integers(-1, 4)), message=draw(texts)),
    )
    _set_attributes(span.attributes, draw(attributes))
    for _ in range(draw(st.integers(0, 1))):
        _set_attributes(span.events.add(time_unix_nano=draw(timestamps), name=draw(texts)).attributes,
                        draw(attributes))
    for _ in range(draw(st.integers(0, 1))):
        link = span.links.add(trace_id=draw(trace_ids), span_id=draw(span_ids), trace_state=draw(texts))
        _set_attributes(link.attributes, draw(attributes))
    return span


@st.composite
def requests(draw: st.DrawFn) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    for _ in range(draw(st.integers(0, 2))):
        resource_spans = request.resource_spans.add(schema_url=draw(texts))
        _set_attributes(resource_spans.resource.attributes, draw(attributes))
        if draw(st.booleans()):
            resource_spans.resource.attributes.add(key="service.name").value.string_value = draw(texts)
        for _ in range(draw(st.integers(1, 2))):
            scope_spans = resource_spans.scope_spans.add()
            scope_spans.scope.name, scope_spans.scope.version = draw(texts), draw(texts)
            for span in draw(st.lists(spans(), min_size=1, max_size=3)):
                scope_spans.spans.add().CopyFrom(span)
    return request


def otlp_json(request: ExportTraceServiceRequest, hex_ids: bool = True) -> bytes:
    """OTLP/JSON: protobuf's JSON mapping, ids as hex (or left base64, which OTLP/JSON forbids)."""
    document = json_format.MessageToDict(request)

    def convert(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("traceId", "spanId", "parentSpanId") and isinstance(value, str):
                    node[key] = base64.b64decode(value).hex()
                else:
                    convert(value)
        elif isinstance(node, list):
            for item in node:
                convert(item)

    if hex_ids:
        convert(document)
    return json.dumps(document).encode()


def _seed_requests() -> list[ExportTraceServiceRequest]:
    simple = ExportTraceServiceRequest()
    rs = simple.resource_spans.add()
    rs.resource.attributes.add(key="service.name").value.string_value = "fuzz-seed"
    span = rs.scope_spans.add(scope=InstrumentationScope(name="seed", version="1")).spans.add(
        trace_id=bytes(range(16)), span_id=bytes(range(8)), name="POST /v1/chat/completions", kind=2,
        start_time_unix_nano=NOW_NS, end_time_unix_nano=NOW_NS + 10**9)
    span.attributes.add(key="gen_ai.usage.input_tokens").value.int_value = 812
    span.attributes.add(key="ratio").value.double_value = 0.25
    span.attributes.add(key="stream").value.bool_value = True
    rich = ExportTraceServiceRequest()
    rich.CopyFrom(simple)
    span = rich.resource_spans[0].scope_spans[0].spans.add(
        trace_id=bytes(range(16)), span_id=bytes(range(8, 16)), parent_span_id=bytes(range(8)), name="child",
        start_time_unix_nano=NOW_NS, end_time_unix_nano=NOW_NS + 5, status=Status(code=2, message="boom"))
    span.attributes.add(key="tags").value.array_value.values.add().string_value = "a"
    kv = span.attributes.add(key="map").value.kvlist_value.values.add(key="inner")
    kv.value.bytes_value = b"\x00\xff"
    event = span.events.add(time_unix_nano=NOW_NS + 1, name="first_token")
    event.attributes.add(key="ttft").value.double_value = 0.1
    link = span.links.add(trace_id=b"\x0a" * 16, span_id=b"\x0b" * 8)
    link.attributes.add(key="why").value.string_value = "retry"
    two = ExportTraceServiceRequest()
    two.CopyFrom(rich)
    two.resource_spans.add().CopyFrom(simple.resource_spans[0])
    return [simple, rich, two]


SEEDS = _seed_requests()
PROTOBUF_SEEDS = [request.SerializeToString() for request in SEEDS]
JSON_SEEDS = [otlp_json(request) for request in SEEDS]


@st.composite
def mutate(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with bit flips, truncations, insertions, deletions, overwrites, duplications."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "overwrite", "duplicate"]))
        pos = draw(st.integers(0, len(out))) if out else 0
        if op == "flip" and pos < len(out):
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del out[pos:]
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del out[pos:pos + draw(st.integers(1, 8))]
        elif op == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=8))
            out[pos:pos + len(chunk)] = chunk
        elif op == "duplicate":
            out[pos:pos] = out[pos:pos + draw(st.integers(1, 64))]
    return bytes(out)


def mutations(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    """A valid request (one of `seeds`), mutated."""
    return st.sampled_from(seeds).flatmap(mutate)


json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**200), 2**200), st.floats(), texts,
    st.sampled_from(["NaN", "Infinity", "-Infinity", "0x10", "", "5b8efff798038103d269b633813fc60c"]),
)
json_documents = st.recursive(json_scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(texts, children, max_size=4)), max_leaves=12)
SPAN_KEYS = ["traceId", "spanId", "parentSpanId", "name", "kind", "startTimeUnixNano", "endTimeUnixNano",
             "attributes", "events", "links", "status", "traceState", "flags", "droppedAttributesCount"]
VALUE_KEYS = ["stringValue", "intValue", "doubleValue", "boolValue", "bytesValue", "arrayValue",
              "kvlistValue"]
otlp_shaped_json = st.builds(
    lambda span, attrs: {"resourceSpans": [{"resource": {"attributes": attrs},
                                            "scopeSpans": [{"spans": [span]}]}]},
    st.dictionaries(st.sampled_from(SPAN_KEYS), json_documents, max_size=6),
    st.lists(st.builds(lambda k, vk, v: {"key": k, "value": {vk: v}}, keys, st.sampled_from(VALUE_KEYS),
                       json_documents), max_size=3),
)
json_bodies = st.one_of(
    json_documents.map(lambda d: json.dumps(d).encode()),
    otlp_shaped_json.map(lambda d: json.dumps(d).encode()),
    st.builds(otlp_json, requests(), st.sampled_from([True, True, True, False])),
    mutations(JSON_SEEDS),
)
protobuf_bodies = st.one_of(
    st.binary(max_size=512),
    mutations(PROTOBUF_SEEDS),
    requests().map(lambda r: r.SerializeToString()),
    st.sampled_from(PROTOBUF_SEEDS),
)


@dataclass
class Payload:
    body: bytes
    content_type: str | None
    encoding: str | None
    chunked: bool
    kind: str

    def __repr__(self) -> str:
        return (f"Payload({self.kind}, content_type={self.content_type!r}, encoding={self.encoding!r}, "
                f"chunked={self.chunked}, {len(self.body)} bytes: {self.body[:120]!r})")


# printable ASCII without surrounding blanks: what a client can put in a header at all
header_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E),
                      max_size=30).map(str.strip)
other_content_types = st.one_of(st.sampled_from([
    None, "text/plain", "application/protobuf", "application/grpc", "application/json; charset=utf-8",
    "APPLICATION/X-PROTOBUF", "application/x-protobuf;foo=bar", "multipart/form-data", "application/jsonl",
    "*/*",
]), header_text)


@st.composite
def wrap(draw: st.DrawFn, body: bytes, natural: str, kind: str, gentle: bool = False) -> Payload:
    """`body` as a request: mostly with its own content type, sometimes another or none; mostly plain,
    sometimes gzipped (properly, truncated, not really, as a bomb) or with another encoding; sometimes
    chunked. `gentle`: more often sent as it should be."""
    intact = 3 if gentle else 1
    choice = draw(st.sampled_from(["natural"] * 8 * intact + ["swapped", "other"]))
    content_type = {"natural": natural, "swapped": JSON if natural == PROTOBUF else PROTOBUF}.get(choice)
    if choice == "other":
        content_type = draw(other_content_types)
    encoding = None
    how = draw(st.sampled_from(["none"] * 6 * intact + ["gzip", "gzip"] * intact + [
        "gzip-truncated", "gzip-bogus", "gzip-bomb", "other"]))
    if how == "gzip":
        body, encoding = gzip.compress(body, compresslevel=1), draw(st.sampled_from(["gzip", "GZIP", "Gzip"]))
    elif how == "gzip-truncated":
        compressed = gzip.compress(body, compresslevel=1)
        body, encoding = compressed[:draw(st.integers(0, len(compressed) - 1))], "gzip"
    elif how == "gzip-bogus":
        encoding = "gzip"
    elif how == "gzip-bomb":
        body, encoding = gzip.compress(b"\0" * draw(st.integers(1, 8)) * FUZZ_MAX_REQUEST_BYTES), "gzip"
    elif how == "other":
        encoding = draw(st.one_of(
            st.sampled_from(["br", "deflate", "zstd", "identity", "", "gzip, br", "x-gzip"]), header_text))
    return Payload(body, content_type, encoding, draw(st.integers(0, 9)) == 0, f"{kind}/{choice}/{how}")


CHEAP_BODIES = {  # kind: (natural content type, bodies)
    "random-bytes": (PROTOBUF, st.binary(max_size=2048)),
    "random-bytes-as-json": (JSON, st.binary(max_size=512)),
    "mutated-protobuf-seed": (PROTOBUF, mutations(PROTOBUF_SEEDS)),
    "mutated-json-seed": (JSON, mutations(JSON_SEEDS)),
    "protobuf-seed": (PROTOBUF, st.sampled_from(PROTOBUF_SEEDS + [b""])),
    "random-json": (JSON, json_documents.map(lambda d: json.dumps(d).encode())),
    "otlp-shaped-json": (JSON, otlp_shaped_json.map(lambda d: json.dumps(d).encode())),
    "oversized": (PROTOBUF, st.integers(FUZZ_MAX_REQUEST_BYTES + 1, 3 * FUZZ_MAX_REQUEST_BYTES).map(bytes)),
}
CHEAP_KINDS = ["random-bytes", "random-bytes-as-json", "mutated-protobuf-seed", "mutated-protobuf-seed",
               "mutated-json-seed", "protobuf-seed", "random-json", "otlp-shaped-json", "oversized"]


@st.composite
def cheap_payloads(draw: st.DrawFn) -> Payload:
    kind = draw(st.sampled_from(CHEAP_KINDS))
    natural, bodies = CHEAP_BODIES[kind]
    return draw(wrap(draw(bodies), natural, kind))


@st.composite
def batches(draw: st.DrawFn, size: int = 20, structured: int = 2) -> list[Payload]:
    """`size` payloads. Structurally generated requests cost most to draw, so each of the `structured`
    ones is sent three ways: as protobuf, as OTLP/JSON (now and then with base64 ids), and mutated;
    the rest are cheaper kinds."""
    out: list[Payload] = []
    for _ in range(structured):
        request = draw(requests())
        raw = request.SerializeToString()
        out.append(draw(wrap(raw, PROTOBUF, "structured-protobuf", gentle=True)))
        body = otlp_json(request, hex_ids=draw(st.integers(0, 9)) > 0)
        out.append(draw(wrap(body, JSON, "structured-json", gentle=True)))
        out.append(draw(wrap(draw(mutate(raw)), PROTOBUF, "mutated-structured")))
    while len(out) < size:
        out.append(draw(cheap_payloads()))
    return out


# ======================================================================== unit level
ERRORS = (otlp.BadRequest, otlp.TooLarge)


def _decode_screen_map(request: ExportTraceServiceRequest, raw: bytes | None, limit: int) -> None:
    """What the receiver and then the writer do with a decoded request: nothing but BadRequest may
    stop it before the spool, nothing at all after."""
    try:
        screened = otlp.screen(request, raw, max_attribute_value_bytes=limit)
    except otlp.BadRequest:
        return
    if raw is not None and not screened.rejected:
        assert screened.payload is raw  # nothing rejected: the original bytes go to the spool
    stored = ExportTraceServiceRequest.FromString(screened.payload)  # as the writer reads the spool
    assert otlp.span_count(stored) == screened.accepted
    columns = map_request(stored)
    assert len(columns) == screened.accepted
    assert all(len(column) == len(columns) for column in columns.as_lists())
    encoded = json.loads(json_columns(columns))
    assert set(encoded) == set(COLUMNS)


gzip_inputs = st.one_of(
    st.binary(max_size=256),
    st.binary(max_size=4096).map(gzip.compress),
    st.builds(lambda b, n: gzip.compress(b)[:n], st.binary(max_size=1024), st.integers(0, 200)),
    st.builds(lambda b, extra: gzip.compress(b) + extra, st.binary(max_size=256), st.binary(max_size=32)),
    st.integers(0, 64 * 1024).map(lambda n: gzip.compress(b"\0" * n)),
    mutations([gzip.compress(seed) for seed in PROTOBUF_SEEDS]),
)


@UNIT
@given(body=gzip_inputs, limit=st.integers(0, 32 * 1024))
def test_gunzip_returns_or_refuses(body: bytes, limit: int) -> None:
    try:
        out = otlp.gunzip(body, limit)
    except ERRORS:
        return
    assert len(out) <= limit


@UNIT
@given(data=st.one_of(st.binary(max_size=4096), st.integers(0, 40_000).map(bytes)),
       limit=st.integers(0, 32 * 1024))
def test_gunzip_round_trip(data: bytes, limit: int) -> None:
    body = gzip.compress(data)
    if len(data) <= limit:
        assert otlp.gunzip(body, limit) == data
    else:
        with pytest.raises(otlp.TooLarge):
            otlp.gunzip(body, limit)


@UNIT
@given(body=protobuf_bodies, limit=st.integers(1, 4096), raw=st.booleans())
def test_decode_protobuf_and_screen_return_or_refuse(body: bytes, limit: int, raw: bool) -> None:
    try:
        request = otlp.decode_protobuf(body)
    except otlp.BadRequest:
        return
    _decode_screen_map(request, body if raw else None, limit)


@UNIT
@given(body=st.one_of(json_bodies, st.binary(max_size=512)), limit=st.integers(1, 4096))
def test_decode_json_and_screen_return_or_refuse(body: bytes, limit: int) -> None:
    try:
        request = otlp.decode_json(body)
    except otlp.BadRequest:
        return
    _decode_screen_map(request, None, limit)


@settings(UNIT, max_examples=200)
@given(request=requests(), limit=st.integers(1, 4096))
def test_every_generated_request_is_decoded_screened_and_mapped(request: ExportTraceServiceRequest,
                                                                limit: int) -> None:
    """Structurally generated requests, both encodings: the whole path to the insert never raises."""
    raw = request.SerializeToString()
    for decode, body, screened_raw in ((otlp.decode_protobuf, raw, raw),
                                       (otlp.decode_json, otlp_json(request), None)):
        try:
            decoded = decode(body)
        except otlp.BadRequest as error:  # only nesting over the parsers' depth limit of 100 is refused
            assert "depth" in str(error) or "Error parsing message" in str(error), error
            continue
        _decode_screen_map(decoded, screened_raw, limit)


def test_screen_keeps_the_original_bytes_when_nothing_is_rejected() -> None:
    raw = PROTOBUF_SEEDS[1]
    screened = otlp.screen(otlp.decode_protobuf(raw), raw, max_attribute_value_bytes=1024)
    assert screened.payload is raw and screened.rejected == 0 and screened.accepted == 2


# ======================================================================== process level
@pytest.fixture(scope="module")
def fuzz_collector(warehouse: WarehouseProcess,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollectorProcess]:
    url = migrated_database(warehouse, "collector_fuzz")
    process = CollectorProcess(url, tmp_path_factory.mktemp("fuzz") / "collector", env={
        "FLEETLENS_COLLECTOR__MAX_REQUEST_BYTES": str(FUZZ_MAX_REQUEST_BYTES),
        "FLEETLENS_COLLECTOR__MAX_ATTRIBUTE_VALUE_BYTES": str(FUZZ_MAX_ATTRIBUTE_BYTES),
        "FLEETLENS_COLLECTOR__RETRY_INITIAL_S": "0.05",  # a refused batch is isolated quickly
        "FLEETLENS_COLLECTOR__RETRY_MAX_S": "1",
    }).start()
    yield process
    process.stop()


def _check_reply(payload: Payload, reply: httpx.Response) -> None:
    assert reply.status_code in ALLOWED, f"{reply.status_code} {reply.content[:300]!r} for {payload!r}"
    as_json = (payload.content_type or "").split(";")[0].strip().lower() == JSON
    expected_type = JSON if as_json else PROTOBUF
    assert reply.headers.get("content-type") == expected_type, f"{reply.headers} for {payload!r}"
    if reply.status_code == 200:
        if as_json:
            json_format.Parse(reply.content, ExportTraceServiceResponse())
        else:
            ExportTraceServiceResponse.FromString(reply.content)
    else:
        status = (json_format.Parse(reply.content, status_pb2.Status()) if as_json
                  else status_pb2.Status.FromString(reply.content))
        assert status.code != 0 and status.message, f"{status} for {payload!r}"


def _valid_request(service: str) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    request.CopyFrom(SEEDS[1])
    request.resource_spans[0].resource.attributes[0].value.string_value = service
    now = time.time_ns()
    for span in request.resource_spans[0].scope_spans[0].spans:
        span.start_time_unix_nano, span.end_time_unix_nano = now, now + 1000
    return request


def _count(warehouse: WarehouseProcess, collector: CollectorProcess, service: str) -> int:
    client = warehouse.client(database=collector.warehouse_url.rsplit("/", 1)[1])
    return client.query("SELECT count() FROM otel_traces WHERE ServiceName = {s:String}",
                        parameters={"s": service}).result_rows[0][0]


@pytest.mark.slow
def test_fuzz_http_10k_payloads(fuzz_collector: CollectorProcess, warehouse: WarehouseProcess) -> None:
    collector = fuzz_collector
    url = collector.endpoint + "/v1/traces"
    process = psutil.Process(collector.process.pid)  # type: ignore[union-attr]
    with httpx.Client(timeout=30) as client:
        assert client.post(url, content=_valid_request("fuzz-before").SerializeToString(),
                           headers={"content-type": PROTOBUF}).status_code == 200
        rss_before = process.memory_info().rss
        sent = 0
        statuses: Counter[int] = Counter()
        kinds: Counter[str] = Counter()
        samples: list[int] = []
        started = time.monotonic()

        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(batch=batches(FUZZ_BATCH))
        def fuzz(batch: list[Payload]) -> None:
            nonlocal sent
            for payload in batch:
                headers = {}
                if payload.content_type is not None:
                    headers["content-type"] = payload.content_type
                if payload.encoding is not None:
                    headers["content-encoding"] = payload.encoding
                body, half = payload.body, len(payload.body) // 2
                content = iter([body[:half], body[half:]]) if payload.chunked else body
                try:
                    reply = client.post(url, content=content, headers=headers)
                except httpx.HTTPError as error:
                    raise AssertionError(f"connection failed ({error!r}) for {payload!r}") from error
                sent += 1
                statuses[reply.status_code] += 1
                kinds[payload.kind.split("/")[0]] += 1
                _check_reply(payload, reply)
                if sent % 1000 == 0:
                    samples.append(process.memory_info().rss)

        fuzz()
        elapsed = time.monotonic() - started
        rss_after = process.memory_info().rss
        print(f"\nfuzz: {sent} payloads in {elapsed:.1f} s ({sent / elapsed:.0f}/s); "
              f"statuses {dict(statuses)}; kinds {dict(kinds)}")
        print(f"collector RSS: before {rss_before / 2**20:.0f} MiB, after {rss_after / 2**20:.0f} MiB, "
              f"every 1000 payloads {[round(s / 2**20) for s in samples]} MiB")
        assert sent >= FUZZ_PAYLOADS
        assert {200, 400, 413, 415} <= set(statuses)  # the generator reaches every outcome
        assert collector.process.poll() is None  # type: ignore[union-attr]
        assert client.get(collector.endpoint + "/health").status_code == 200
        assert rss_after < rss_before + 150 * 2**20

        after = client.post(url, content=_valid_request("fuzz-after").SerializeToString(),
                            headers={"content-type": PROTOBUF})
        assert after.status_code == 200 and not ExportTraceServiceResponse.FromString(after.content).HasField(
            "partial_success")
    wait_for(lambda: _count(warehouse, collector, "fuzz-after") == 2, timeout_s=180)
    metrics = collector.metrics()
    print("collector counters:", {k: v for k, v in metrics.items() if k.endswith("_total") or "_total{" in k})
    assert metrics['fleetlens_collector_accepted_spans_total{protocol="http"}'] > 0
    assert metrics['fleetlens_collector_rejected_spans_total{protocol="http"}'] > 0  # partial successes
    assert metrics["fleetlens_collector_dead_lettered_requests_total"] == 0  # every accepted span was stored


@st.composite
def grpc_batches(draw: st.DrawFn, size: int = 10) -> list[bytes]:
    """One structurally generated request, as it is and mutated, then cheaper protobuf bodies."""
    raw = draw(requests()).SerializeToString()
    out = [raw, draw(mutate(raw))]
    cheap = st.one_of(st.binary(max_size=1024), mutations(PROTOBUF_SEEDS), st.sampled_from(PROTOBUF_SEEDS),
                      st.integers(FUZZ_MAX_REQUEST_BYTES - 16, 2 * FUZZ_MAX_REQUEST_BYTES).map(bytes))
    while len(out) < size:
        out.append(draw(cheap))
    return out


def test_fuzz_grpc_payloads(fuzz_collector: CollectorProcess) -> None:
    """The same protobuf bodies over OTLP/gRPC: OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED, never UNKNOWN."""
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
               grpc.StatusCode.UNAVAILABLE}
    codes: Counter[str] = Counter()
    with grpc.insecure_channel(f"127.0.0.1:{fuzz_collector.grpc_port}") as channel:
        export = channel.unary_unary("/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                                     request_serializer=None, response_deserializer=None)

        @settings(max_examples=60, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(batch=grpc_batches())
        def fuzz(batch: list[bytes]) -> None:
            for body in batch:
                try:
                    ExportTraceServiceResponse.FromString(export(body, timeout=30))
                    code = grpc.StatusCode.OK
                except grpc.RpcError as error:
                    code = error.code()  # type: ignore[attr-defined]
                codes[code.name] += 1
                assert code in allowed, f"{code} for {body[:120]!r}"

        fuzz()
    print(f"\ngrpc fuzz: {sum(codes.values())} payloads; codes {dict(codes)}")
    assert sum(codes.values()) >= 500 and {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"} <= set(codes)
    assert fuzz_collector.process.poll() is None  # type: ignore[union-attr]
