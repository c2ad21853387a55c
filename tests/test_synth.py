"""`fleetlens synth`: determinism, plausibility, trace shape, replica cold starts, the direct path equal to
the OTLP path through the real warehouse, fleet_metrics consistency, agreement with real vLLM captures,
senders."""

from __future__ import annotations

import dataclasses
import threading
from concurrent import futures
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import grpc
import numpy as np
import pytest
import typer
from fleetlens.collector.mapping import COLUMNS, map_request
from fleetlens.collector.scrape import parse_metrics
from fleetlens.collector.synth.cli import parse_duration
from fleetlens.collector.synth.direct import cold_starts_table, traces_table
from fleetlens.collector.synth.fleet import Errors, default_fleet
from fleetlens.collector.synth.generate import BLOCK, NS_PER_S, Outage, Synthesizer, to_ns, traffic_shape
from fleetlens.collector.synth.metrics import SERIES, MetricsBuilder, metrics_table
from fleetlens.collector.synth.otlp import cold_start_requests, export_requests
from fleetlens.collector.synth.run import send_to_collector, write_to_warehouse
from fleetlens.collector.synth.spans import REPLICA_SCOPE, VLLM_SCOPE, resources
from fleetlens.collector.synth.transport import OtlpGrpcSender, OtlpHttpSender, retry_after_seconds
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from typer.testing import CliRunner

from fleetlens import semconv as sc
from fleetlens.schema import RenderOptions, migrate

START = "2026-01-05T00:00:00Z"  # a Monday
FIXTURES = Path(__file__).parent / "fixtures" / "vllm"


def frames(seed: int = 1, chunk: int = 65_536, **kwargs):
    kwargs.setdefault("n_requests", 2000)
    return list(Synthesizer(seed, kwargs.pop("start", START), **kwargs).requests(chunk))


def otlp_rows(frame) -> dict[str, dict]:
    """SpanId → row, as the collector's mapping writes the OTLP path's spans."""
    rows = {}
    for message in export_requests(frame):
        columns = map_request(message).columns
        for i, span_id in enumerate(columns["SpanId"]):
            rows[span_id] = {name: columns[name][i] for name in COLUMNS}
    return rows


def cold_start_rows(synth, max_spans: int = 1000) -> list[dict]:
    """The run's cold starts as the collector's mapping writes them (OTLP path), in replica order."""
    rows = []
    for message in cold_start_requests(synth, max_spans):
        columns = map_request(message).columns
        rows += [{name: columns[name][i] for name in COLUMNS} for i in range(len(columns["SpanId"]))]
    return rows


def flaky_fleet():
    """Errors often enough that a few thousand requests cover every outcome."""
    fleet = default_fleet()
    return dataclasses.replace(fleet, errors=Errors(upstream_5xx=0.05, upstream_timeout=0.04, auth_failure=0.01))


# -- determinism ------------------------------------------------------------------------


def test_same_seed_same_bytes_and_other_seed_differs():
    def wire(seed: int) -> list[bytes]:
        return [m.SerializeToString() for f in frames(seed, n_requests=600) for m in export_requests(f)]

    first, again, other = wire(7), wire(7), wire(8)
    assert first == again
    assert first != other
    a, b = traces_table(frames(7, n_requests=600)[0]), traces_table(frames(7, n_requests=600)[0])
    assert a.equals(b)

    def cold(seed: int, start: str = START, **kwargs) -> list[bytes]:
        kwargs.setdefault("n_requests", 600)
        return [m.SerializeToString() for m in cold_start_requests(Synthesizer(seed, start, **kwargs))]

    assert cold(7) == cold(7) != cold(8)
    # the cold starts depend on the seed, the fleet and the range start only, not on the run's length
    assert cold(7) == cold(7, n_requests=5) == cold(7, n_requests=None, duration_s=60)
    assert cold(7) != cold(7, start="2026-01-05T00:00:01Z")
    assert cold_starts_table(Synthesizer(7, START, n_requests=600)).equals(
        cold_starts_table(Synthesizer(7, START, n_requests=1)))


def test_requests_do_not_depend_on_chunk_size():
    small = frames(3, chunk=BLOCK, n_requests=3 * BLOCK + 100)
    large = frames(3, chunk=10 * BLOCK, n_requests=3 * BLOCK + 100)
    assert len(small) == 4 and len(large) == 1
    for name in ("arrival_ns", "prompt_tokens", "status", "att_replica", "e2e_us", "trace_id", "span_ids"):
        assert np.array_equal(np.concatenate([getattr(f, name) for f in small]), getattr(large[0], name)), name


# -- plausibility -----------------------------------------------------------------------


def test_lengths_errors_and_latency_are_plausible():
    frame = frames(11, n_requests=40_000)[0]
    t = frame.tables
    p50, p99 = np.percentile(frame.prompt_tokens, [50, 99])
    assert p99 / p50 > 6  # heavy tail

    # rejections near the configured rates
    fleet = t.fleet
    expected_429 = (1 - fleet.errors.auth_failure) * float(np.sum(np.diff(t.customer_cum, prepend=0) * t.rate_limited))
    assert abs(np.mean(frame.status == 429) - expected_429) < 0.25 * expected_429
    assert abs(np.mean(frame.status == 401) - fleet.errors.auth_failure) < 0.001
    attempted = frame.att_outcome[frame.att_outcome >= 0]
    mult = t.error_multiplier[frame.att_model[frame.att_outcome >= 0]]
    assert abs(np.mean(attempted == 1) - np.mean(mult) * fleet.errors.upstream_5xx) < 0.0015
    retried = frame.attempts == 2
    assert retried.any() and (frame.att_outcome[retried, 0] != 0).all()
    fallback = retried & (frame.att_model[:, 1] != frame.att_model[:, 0])
    assert fallback.any()  # some retries went to the fallback model
    assert 0.02 < np.mean(frame.variant[frame.feature == t.features.index("chat-assistant")] == 1) < 0.06

    # physically plausible per model: decode time per token tracks model speed, TTFT ≥ prefill
    ok = frame.success
    served = frame.att_model[np.arange(len(frame)), np.maximum(frame.attempts - 1, 0)]
    tpot = frame.decode_us / np.maximum(frame.output_tokens - 1, 1)
    small, big = t.models.index("llama-3.2-3b-instruct"), t.models.index("llama-3.3-70b-instruct")
    many = ok & (frame.output_tokens > 20) & (frame.preemptions == 0)
    assert np.median(tpot[many & (served == small)]) < 0.6 * np.median(tpot[many & (served == big)])
    assert (frame.ttft_us[ok] >= frame.queue_us[ok] + frame.prefill_us[ok]).all()
    rag = frame.stage_dur_us[:, 3]
    assert np.median(rag[rag > 0]) > 20 * np.median(frame.stage_dur_us[frame.stage_dur_us[:, 0] > 0, 0])


def test_daily_cycle_weekends_and_load_dependent_queueing():
    frame = frames(5, n_requests=None, duration_s=7 * 86_400, rate=0.25, chunk=1 << 20)[0]
    hours = (frame.arrival_ns // NS_PER_S // 3600) % 24
    per_hour = np.bincount(hours, minlength=24)
    assert per_hour[15] > 2.5 * per_hour[3]  # peak 15:00 UTC, trough 03:00
    day = (frame.arrival_ns - to_ns(START)) // (86_400 * NS_PER_S)
    per_day = np.bincount(day, minlength=7)
    assert 0.4 < per_day[5:].mean() / per_day[:5].mean() < 0.7

    # at the default rate, the same fleet queues far more at the weekday peak than at night
    def queue_s(start: str) -> float:
        f = frames(5, n_requests=12_000, start=start)[0]
        assert traffic_shape(f.arrival_ns[:1], f.tables.fleet.traffic)[0] > 0
        big = f.success & (f.att_model[np.arange(len(f)), np.maximum(f.attempts - 1, 0)]
                           == f.tables.models.index("llama-3.3-70b-instruct"))
        return float(np.mean(f.queue_us[big]))

    assert queue_s("2026-01-07T15:00:00Z") > 3 * queue_s("2026-01-07T03:00:00Z")


# -- trace shape ------------------------------------------------------------------------


def test_every_trace_has_the_contract_shape():
    frame = frames(2, n_requests=1500, fleet=flaky_fleet())[0]
    rows = otlp_rows(frame)
    by_trace: dict[str, list[dict]] = {}
    for row in rows.values():
        by_trace.setdefault(row["TraceId"], []).append(row)
    assert len(by_trace) == len(frame)
    outcomes = set()
    for spans in by_trace.values():
        ids = {s["SpanId"]: s for s in spans}
        roots = [s for s in spans if s["ParentSpanId"] == ""]
        assert len(roots) == 1 and roots[0]["SpanName"] == sc.ROOT_SPAN and roots[0]["SpanKind"] == "Server"
        root = roots[0]
        end = root["Timestamp"] + root["Duration"]
        status = root["SpanAttributes"][sc.HTTP_STATUS_CODE]
        names = [s["SpanName"] for s in spans]
        for span in spans:
            assert span is root or span["ParentSpanId"] in ids
            if span["ServiceName"] == sc.GATEWAY_SERVICE:
                assert root["Timestamp"] <= span["Timestamp"] and span["Timestamp"] + span["Duration"] <= end
        stages = [s for s in spans if s["SpanName"] in sc.STAGES]
        assert all(s["SpanAttributes"][sc.STAGE] == s["SpanName"] and s["ParentSpanId"] == root["SpanId"]
                   for s in stages)
        upstream = [s for s in spans if s["SpanName"].startswith(sc.UPSTREAM_SPAN_PREFIX)]
        llm = [s for s in spans if s["SpanName"] == sc.VLLM_SPAN]
        if status in ("401", "429"):
            assert not upstream and not llm and "route" not in names
            continue
        assert set(sc.STAGES) - {"retrieval"} <= set(names) and len(upstream) >= 1
        assert sorted(int(u["SpanAttributes"][sc.ATTEMPT]) for u in upstream) == list(range(1, len(upstream) + 1))
        assert len(llm) == (status == "200")
        for u in upstream:
            outcomes.add(u["SpanAttributes"].get(sc.ERROR_TYPE, "ok"))
            assert u["SpanName"] == sc.UPSTREAM_SPAN_PREFIX + u["SpanAttributes"][sc.REQUEST_MODEL]
        for span in llm:
            parent = ids[span["ParentSpanId"]]
            assert parent["SpanKind"] == "Client" and "error.type" not in parent["SpanAttributes"]
            assert span["SpanKind"] == "Server"
            assert span["ServiceName"] == sc.VLLM_SERVICE_PREFIX + parent["SpanAttributes"][sc.REPLICA]
            assert parent["Timestamp"] < span["Timestamp"]
            assert span["Timestamp"] + span["Duration"] < parent["Timestamp"] + parent["Duration"]
            attrs = span["SpanAttributes"]
            assert float(attrs[sc.VLLM_E2E]) == pytest.approx(span["Duration"] / 1e9, abs=1e-6)
            assert attrs[sc.VLLM_PROMPT_TOKENS] == root["SpanAttributes"][sc.USAGE_INPUT_TOKENS]
    assert {"ok", "500", "503", "httpx.ReadTimeout"} <= outcomes


def test_synthetic_llm_request_looks_like_real_vllm():
    """Key names, value types, scope and resource keys as tests/fixtures/vllm captured them."""
    real = ExportTraceServiceRequest.FromString((FIXTURES / "llm_request_http.otlp.pb").read_bytes())
    ours = next(export_requests(frames(4, n_requests=200)[0], max_spans=100_000))

    def llm_spans(request):
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                for span in ss.spans:
                    if span.name == sc.VLLM_SPAN:
                        yield rs, ss, span

    def types(spans):
        return {kv.key: kv.value.WhichOneof("value") for _, _, s in spans for kv in s.attributes}

    real_spans, our_spans = list(llm_spans(real)), list(llm_spans(ours))
    assert types(our_spans) == types(real_spans)
    assert {(ss.scope.name, ss.scope.version) for _, ss, _ in our_spans} == {VLLM_SCOPE}
    assert {(ss.scope.name, ss.scope.version) for _, ss, _ in real_spans} == {VLLM_SCOPE}
    real_keys = {kv.key for rs, _, _ in real_spans for kv in rs.resource.attributes}
    assert {kv.key for rs, _, _ in our_spans for kv in rs.resource.attributes} == real_keys
    assert all(s.kind == real_spans[0][2].kind for _, _, s in our_spans)


# -- replica cold starts --------------------------------------------------------------


def test_one_cold_start_per_replica_ready_at_the_range_start():
    fleet = default_fleet()
    synth = Synthesizer(21, START, n_requests=300)
    rows = cold_start_rows(synth, max_spans=5)  # several messages: still one span per replica
    assert len(rows) == len(fleet.replicas) == len(synth.tables.replicas)
    assert len({r["TraceId"] for r in rows}) == len(rows)  # each launch is its own trace
    range_start = to_ns(START)
    ranges = {"llama-3.2-3b-instruct": (35, 50), "llama-3.1-8b-instruct": (50, 80),
              "llama-3.1-8b-instruct-ft2": (50, 80), "llama-3.3-70b-instruct": (150, 240)}
    for row, (name, model) in zip(rows, fleet.replicas):
        attrs, resource = row["SpanAttributes"], row["ResourceAttributes"]
        assert row["SpanName"] == sc.COLD_START_SPAN and row["SpanKind"] == "Internal"
        assert row["ServiceName"] == sc.REPLICA_SERVICE == resource["service.name"]
        assert (row["ScopeName"], row["ScopeVersion"]) == REPLICA_SCOPE
        assert row["StatusCode"] == "Ok" and row["StatusMessage"] == "" and row["ParentSpanId"] == ""
        assert int(row["TraceId"], 16) and int(row["SpanId"], 16)
        assert row["Timestamp"] + row["Duration"] == range_start  # ready exactly at the range start
        assert float(attrs[sc.LOAD_SECONDS]) * 1e9 == pytest.approx(row["Duration"], abs=1)
        assert ranges[model.name][0] <= row["Duration"] / 1e9 <= ranges[model.name][1]
        assert attrs[sc.REPLICA] == name == resource[sc.REPLICA]
        assert attrs[sc.REQUEST_MODEL] == model.name == resource[sc.REQUEST_MODEL]
        assert attrs[sc.MODEL_VARIANT] == model.variant == resource[sc.MODEL_VARIANT]
        assert attrs[sc.GPU_TYPE] == model.gpu and int(attrs[sc.GPU_COUNT]) == model.gpus
        assert float(attrs[sc.GPU_HOURLY_USD]) == model.gpu_hour_usd
        assert attrs[sc.REPLICA_URL] == f"http://{name}.vllm.internal:8000"
        assert sc.ERROR_TYPE not in attrs
    by_model = {m.name: [r["Duration"] for r, (_, m2) in zip(rows, fleet.replicas) if m2 is m] for m in fleet.models}
    assert len(set(by_model["llama-3.3-70b-instruct"])) > 1  # replicas of one model load in different times
    assert min(by_model["llama-3.3-70b-instruct"]) > 2 * max(by_model["llama-3.1-8b-instruct"])

    # value types as the real launcher (serving/replica.py) sends them
    span = next(cold_start_requests(synth)).resource_spans[0].scope_spans[0].spans[0]
    types = {kv.key: kv.value.WhichOneof("value") for kv in span.attributes}
    assert types == {sc.REPLICA: "string_value", sc.REQUEST_MODEL: "string_value", sc.MODEL_VARIANT: "string_value",
                     sc.REPLICA_URL: "string_value", sc.GPU_TYPE: "string_value", sc.GPU_COUNT: "int_value",
                     sc.LOAD_SECONDS: "double_value", sc.GPU_HOURLY_USD: "double_value"}
    assert [m["load_seconds"] for m in fleet.describe()["models"]] == [m.load_seconds for m in fleet.models]

    # the fleet_metrics scrapes follow: the first `up` sample of every replica is at or after the range start
    builder = MetricsBuilder(synth)
    first = builder.finish(range_start + 20 * NS_PER_S)
    up = first.series == 0
    assert set(first.replica[up].tolist()) == set(range(len(rows)))
    assert first.ts_ms[up].min() * 1_000_000 >= range_start


class _Inserts:
    """A warehouse client that keeps what `write_to_warehouse` inserts."""

    def __init__(self) -> None:
        self.tables: list[tuple[str, object]] = []

    def insert_arrow(self, table: str, data, database=None) -> None:
        self.tables.append((table, data))

    def cold_starts(self) -> list[str]:
        return [span_id for name, t in self.tables if name == "otel_traces"
                for span_id, span_name in zip(t["SpanId"].to_pylist(), t["SpanName"].to_pylist())
                if span_name == sc.COLD_START_SPAN]


class _Messages:
    def __init__(self) -> None:
        self.messages: list[ExportTraceServiceRequest] = []

    def send(self, request: ExportTraceServiceRequest) -> int:
        self.messages.append(request)
        return 0

    def close(self) -> None:
        pass

    def cold_starts(self) -> list[str]:
        return [span.span_id.hex() for m in self.messages for rs in m.resource_spans for ss in rs.scope_spans
                for span in ss.spans if span.name == sc.COLD_START_SPAN]


def test_runs_carry_the_cold_starts_once_however_chunked():
    replicas = len(default_fleet().replicas)
    n = BLOCK + 50
    expected = [r["SpanId"] for r in cold_start_rows(Synthesizer(4, START, n_requests=n))]
    for chunk in (BLOCK, 10 * BLOCK):
        client = _Inserts()
        stats = write_to_warehouse(Synthesizer(4, START, n_requests=n), client, chunk=chunk, metrics=False)
        assert len(client.tables) == (3 if chunk == BLOCK else 2)  # the cold starts, then 2 chunks / 1 chunk
        assert client.cold_starts() == expected and stats.cold_starts == replicas
        assert stats.spans == sum(t.num_rows for _, t in client.tables)
        assert set(client.tables[0][1]["SpanName"].to_pylist()) == {sc.COLD_START_SPAN}  # the run's first insert

    sender = _Messages()
    stats = send_to_collector(Synthesizer(4, START, n_requests=n), sender, chunk=BLOCK, max_spans=500)
    assert sender.cold_starts() == expected and stats.cold_starts == replicas
    assert stats.spans == sum(len(ss.spans) for m in sender.messages for rs in m.resource_spans
                              for ss in rs.scope_spans) and stats.messages == len(sender.messages)
    assert {span.name for rs in sender.messages[0].resource_spans for ss in rs.scope_spans
            for span in ss.spans} == {sc.COLD_START_SPAN}  # the run's first message

    client, sender = _Inserts(), _Messages()
    write_to_warehouse(Synthesizer(4, START, n_requests=50), client, metrics=False, cold_starts=False)
    send_to_collector(Synthesizer(4, START, n_requests=50), sender, cold_starts=False)
    assert client.cold_starts() == [] and sender.cold_starts() == []


# -- the direct path equals the OTLP path, through the warehouse -------------------------


def test_direct_rows_equal_mapped_otlp_rows_in_the_warehouse(warehouse):
    synth = Synthesizer(9, START, n_requests=1200, fleet=flaky_fleet(),
                        outages=[Outage("llama-8b-0", to_ns(START), to_ns(START) + 600 * NS_PER_S)])
    frame = next(synth.requests())
    assert set(np.unique(frame.att_outcome)) == {-1, 0, 1, 2, 3}  # all outcomes, events included
    client = warehouse.client()
    for db in ("synth_otlp", "synth_direct"):
        client.command(f"DROP DATABASE IF EXISTS {db}")
        migrate(client, RenderOptions(database=db))
    for message in [*cold_start_requests(synth), *export_requests(frame)]:
        cols = map_request(message)
        client.insert("otel_traces", cols.as_lists(), column_names=list(COLUMNS), database="synth_otlp",
                      column_oriented=True)
    client.insert_arrow("otel_traces", cold_starts_table(synth), database="synth_direct")
    client.insert_arrow("otel_traces", traces_table(frame), database="synth_direct")

    select = ", ".join(f"`{c}`" for c in COLUMNS).replace("`Timestamp`", "toUnixTimestamp64Nano(Timestamp)")
    select = select.replace("`Events.Timestamp`", "arrayMap(t -> toUnixTimestamp64Nano(t), `Events.Timestamp`)")
    otlp = client.query(f"SELECT {select} FROM synth_otlp.otel_traces ORDER BY SpanId").result_rows
    direct = client.query(f"SELECT {select} FROM synth_direct.otel_traces ORDER BY SpanId").result_rows
    assert len(otlp) == frame.span_count + len(synth.tables.replicas) == len(direct)
    for a, b in zip(otlp, direct):
        assert a == b, [(name, x, y) for name, x, y in zip(COLUMNS, a, b) if x != y]
    keys = client.query("SELECT mapKeys(SpanAttributes) FROM synth_direct.otel_traces LIMIT 50").result_rows
    assert all(list(k[0]) == sorted(k[0]) for k in keys)
    cold = client.query(f"SELECT count(), countIf(toUnixTimestamp64Nano(Timestamp) + Duration = {to_ns(START)}) "
                        f"FROM synth_direct.otel_traces WHERE SpanName = '{sc.COLD_START_SPAN}'").result_rows
    assert cold == [(len(synth.tables.replicas),) * 2]


# -- fleet_metrics --------------------------------------------------------------------------


def test_metrics_are_monotone_consistent_and_down_during_an_outage():
    start = to_ns("2026-01-05T14:00:00Z")
    outage = Outage("llama-8b-1", start + 600 * NS_PER_S, start + 840 * NS_PER_S)
    synth = Synthesizer(6, start, duration_s=1800, outages=[outage])
    builder, parts, all_frames = MetricsBuilder(synth), [], []
    for frame in synth.requests(BLOCK):
        all_frames.append(frame)
        parts.append(builder.feed(frame))
    parts.append(builder.finish(synth.end_ns - 1))
    ts, rep, ser, val = (np.concatenate([getattr(p, f) for p in parts]) for f in ("ts_ms", "replica", "series", "value"))
    names = [s.metric for s in SERIES]
    types = [s.metric_type for s in SERIES]
    r = synth.tables.replicas.index(outage.replica)

    up = ser == 0
    in_window = (ts * 1_000_000 >= outage.start_ns) & (ts * 1_000_000 < outage.end_ns)
    assert (val[up & (rep == r) & in_window] == 0).all() and (up & (rep == r) & in_window).sum() == 16
    assert (val[up & ~((rep == r) & in_window)] == 1).all()
    assert not ((rep == r) & in_window & ~up).any()  # a down replica reports nothing else

    for j, series in enumerate(SERIES):
        if types[j] in ("counter", "histogram"):
            for replica in range(len(synth.tables.replicas)):
                values = val[(ser == j) & (rep == replica)][np.argsort(ts[(ser == j) & (rep == replica)])]
                assert (np.diff(values) >= 0).all(), (series.metric, replica)

    # counters agree with the requests: prompt tokens of every request whose first token came by the last scrape
    replica = synth.tables.replicas.index("llama-70b-0")
    mask = (ser == names.index("vllm:prompt_tokens_total")) & (rep == replica)
    last_ts, last_value = ts[mask].max(), val[mask][np.argmax(ts[mask])]
    expected = 0
    for f in all_frames:
        first_token = f.arrival_ns + (f.v_start_us + f.ttft_us) * 1000
        hit = f.success & (f.served_replica == replica) & (first_token <= last_ts * 1_000_000)
        expected += int(f.prompt_tokens[hit].sum())
    assert last_value == expected > 0
    inf = (ser == names.index("vllm:time_to_first_token_seconds_bucket") + len(
        [s for s in SERIES if s.metric == "vllm:time_to_first_token_seconds_bucket"]) - 1) & (rep == replica)
    count = (ser == names.index("vllm:time_to_first_token_seconds_count")) & (rep == replica)
    assert np.array_equal(val[inf], val[count])

    # same samples whatever the chunking
    other = Synthesizer(6, start, duration_s=1800, outages=[outage])
    b2 = MetricsBuilder(other)
    again = [b2.feed(f) for f in other.requests(8 * BLOCK)] + [b2.finish(other.end_ns - 1)]
    key = lambda t, r_, s, v: sorted(zip(t.tolist(), r_.tolist(), s.tolist(), v.tolist()))
    assert key(ts, rep, ser, val) == key(*(np.concatenate([getattr(p, f) for p in again])
                                           for f in ("ts_ms", "replica", "series", "value")))


def test_metric_names_types_and_labels_match_a_real_scrape():
    rows = parse_metrics((FIXTURES / "metrics.txt").read_text(), replica="tiny-0", model="tiny-llama",
                         ts=datetime(2026, 1, 1, tzinfo=timezone.utc))
    real = {(r.metric, r.metric_type, tuple(sorted(r.labels.items()))) for r in rows}
    synth = Synthesizer(1, START, n_requests=50)
    table = metrics_table(MetricsBuilder(synth).finish(to_ns(START) + 20 * NS_PER_S), synth)
    ours = {(m, t, tuple(sorted(labels))) for m, t, labels in
            zip(table["metric"].to_pylist(), table["metric_type"].to_pylist(), table["labels"].to_pylist())}
    assert {o for o in ours if o[0] != "up"} <= real
    assert ("up", "gauge", ()) in ours


# -- senders, CLI ---------------------------------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    bodies: ClassVar[list[bytes]] = []
    refuse_first: ClassVar[int] = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).refuse_first > 0:
            type(self).refuse_first -= 1
            self.send_response(503 if self.refuse_first % 2 else 429)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        assert self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
        type(self).bodies.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_otlp_http_sender_posts_protobuf_and_honours_retry_after():
    handler = type("Handler", (_Recorder,), {"bodies": [], "refuse_first": 2})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    waits: list[float] = []
    sender = OtlpHttpSender(f"http://127.0.0.1:{server.server_address[1]}", sleep=waits.append)
    try:
        synth = Synthesizer(12, START, n_requests=400)
        stats = send_to_collector(synth, sender, max_spans=500)
    finally:
        sender.close()
        server.shutdown()
    assert waits == [0.0, 0.0]  # Retry-After: 0, twice
    spans = sum(len(ss.spans) for body in handler.bodies for rs in ExportTraceServiceRequest.FromString(body)
                .resource_spans for ss in rs.scope_spans)
    assert len(handler.bodies) == stats.messages and spans == stats.spans > 400 * 5
    assert stats.cold_starts == len(synth.tables.replicas)
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:30 GMT", datetime(2015, 10, 21, 7, 28, tzinfo=timezone.utc)) == 30
    assert retry_after_seconds("1.5") == 1.5 and retry_after_seconds("soon") is None


def test_otlp_grpc_sender_exports():
    received: list[ExportTraceServiceRequest] = []

    class Service(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            received.append(request)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    sender = OtlpGrpcSender(f"127.0.0.1:{port}")
    try:
        stats = send_to_collector(Synthesizer(13, START, n_requests=150), sender)
    finally:
        sender.close()
        server.stop(0)
    assert len(received) == stats.messages and sum(
        len(ss.spans) for r in received for rs in r.resource_spans for ss in rs.scope_spans) == stats.spans


def test_cli_writes_traces_and_metrics_to_the_warehouse(warehouse, monkeypatch):
    from fleetlens.cli import app

    client = warehouse.client()
    client.command("DROP DATABASE IF EXISTS synth_cli")
    migrate(client, RenderOptions(database="synth_cli"))
    monkeypatch.setenv("FLEETLENS_WAREHOUSE_URL", f"{warehouse.url}/synth_cli")
    result = CliRunner().invoke(app, ["synth", "-n", "700", "--seed", "3", "--start", "2026-01-05T12:00:00Z"])
    assert result.exit_code == 0, result.output
    spans = client.command("SELECT count() FROM synth_cli.otel_traces")
    roots = client.command(f"SELECT count() FROM synth_cli.otel_traces WHERE SpanName = '{sc.ROOT_SPAN}'")
    assert roots == 700 and spans > 700 * 6
    start_ns = to_ns("2026-01-05T12:00:00Z")
    cold = client.query(
        "SELECT ServiceName, SpanAttributes['fleetlens.replica'], toUnixTimestamp64Nano(Timestamp) + Duration, "
        "Duration, SpanAttributes['fleetlens.replica.load_seconds'] FROM synth_cli.otel_traces "
        f"WHERE SpanName = '{sc.COLD_START_SPAN}'").result_rows
    assert sorted(r[1] for r in cold) == sorted(name for name, _ in default_fleet().replicas)
    assert all(service == sc.REPLICA_SERVICE and end == start_ns and duration == round(float(load) * 1e9)
               for service, _, end, duration, load in cold)
    assert client.command("SELECT count() FROM synth_cli.fleet_metrics WHERE metric = 'up'") > 0
    stats = write_to_warehouse(Synthesizer(3, "2026-01-05T12:00:00Z", n_requests=700), client,
                               database="synth_cli", metrics=False)
    assert stats.spans == spans


def test_duration_parsing_and_resources():
    assert parse_duration("90") == 90 and parse_duration("1h30m") == 5400 and parse_duration("2d") == 172_800
    with pytest.raises(typer.BadParameter):
        parse_duration("3 weeks")
    res = resources(Synthesizer(1, START, n_requests=1).tables, seed=1)
    assert res[0]["service.name"] == sc.GATEWAY_SERVICE
    assert {r["service.name"] for r in res[1:]} == {f"vllm-{name}" for name, _ in default_fleet().replicas}
