"""The vLLM /metrics scraper: real vLLM text in, real warehouse rows out, down replicas as data."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from conftest import free_port
from fleetlens.collector.scrape import (
    COLUMNS,
    MetricRow,
    MetricsScraper,
    ScrapeStats,
    WarehouseWriter,
    build_scraper,
    parse_metrics,
    scrape_target,
)

from fleetlens.config import ScrapeTarget, Settings, WarehouseURL
from fleetlens.schema import RenderOptions, migrate

FIXTURE = Path(__file__).parent / "fixtures" / "vllm" / "metrics.txt"
METRICS_TEXT = FIXTURE.read_text()
TS = datetime(2026, 11, 23, 12, 0, 0, 123000, tzinfo=UTC)
SLOW_S = 3.0  # how long the slow endpoint sits on a request; far above the scrape timeout used here
TIMEOUT_S = 0.5

REQUIRED = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prompt_tokens_total": "counter",
    "vllm:generation_tokens_total": "counter",
    "vllm:prefix_cache_queries_total": "counter",
    "vllm:prefix_cache_hits_total": "counter",
    "vllm:num_preemptions_total": "counter",
}
HISTOGRAMS = (
    "vllm:time_to_first_token_seconds",
    "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds",
    "vllm:request_prefill_time_seconds",
    "vllm:request_decode_time_seconds",
    "vllm:inter_token_latency_seconds",
    "vllm:request_time_per_output_token_seconds",
)


def sample_in_file(name: str, **labels: str) -> float:
    """A sample's value read straight off the fixture text (independent of the parser under test)."""
    for line in METRICS_TEXT.splitlines():
        match = re.fullmatch(r"([^{\s]+)(?:\{(.*)\})? (\S+)", line)
        if not match or match[1] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match[3])
    raise AssertionError(f"{name} {labels} not in {FIXTURE.name}")


def by_metric(rows: list[MetricRow]) -> dict[str, list[MetricRow]]:
    out: dict[str, list[MetricRow]] = {}
    for row in rows:
        out.setdefault(row.metric, []).append(row)
    return out


# --- parsing the captured vLLM text -------------------------------------------------------------

def test_captured_metrics_parse_with_types_values_and_labels():
    rows = parse_metrics(METRICS_TEXT, replica="tiny-0", model="tiny-llama", ts=TS)
    metrics = by_metric(rows)
    for name, kind in REQUIRED.items():
        assert [r.metric_type for r in metrics[name]] == [kind], name
        assert metrics[name][0].value == sample_in_file(name)
    # The five captured requests asked for 8 + 16 + 1 + 12 + 6 tokens with ignore_eos (README.md).
    assert metrics["vllm:generation_tokens_total"][0].value == 43
    assert metrics["vllm:prompt_tokens_total"][0].value > 0
    assert {r.ts for r in rows} == {TS} and {r.replica for r in rows} == {"tiny-0"}
    assert {r.model for r in rows} == {"tiny-llama"}
    # model_name duplicates the model column and goes; engine (the DP engine index) stays.
    assert all("model_name" not in r.labels for r in rows)
    assert metrics["vllm:num_requests_running"][0].labels == {"engine": "0"}
    finished = {r.labels["finished_reason"]: r.value for r in metrics["vllm:request_success_total"]}
    assert finished["length"] == 5 and finished["stop"] == 0


@pytest.mark.parametrize("histogram", HISTOGRAMS)
def test_histograms_keep_buckets_sum_and_count(histogram):
    rows = by_metric(parse_metrics(METRICS_TEXT, replica="r", model="tiny-llama", ts=TS))
    buckets = rows[histogram + "_bucket"]
    assert {r.metric_type for r in buckets} == {"histogram"}
    bounds = [r.labels["le"] for r in buckets]
    assert bounds[-1] == "+Inf" and len(set(bounds)) == len(bounds) > 2
    counts = [r.value for r in buckets]
    assert counts == sorted(counts), "cumulative buckets never decrease"
    (count,), (total,) = rows[histogram + "_count"], rows[histogram + "_sum"]
    assert counts[-1] == count.value == sample_in_file(histogram + "_count")
    assert total.value == sample_in_file(histogram + "_sum")
    assert buckets[0].value == sample_in_file(histogram + "_bucket", le=bounds[0])
    assert count.labels == {"engine": "0"} and "le" not in total.labels


def test_only_vllm_and_http_request_counts_are_kept():
    rows = parse_metrics(METRICS_TEXT, replica="r", model="tiny-llama", ts=TS)
    names = {r.metric for r in rows}
    assert "vllm:cache_config_info" in names  # every vllm: family, not just the ones dashboards use
    assert not {n for n in names if n.startswith(("python_", "process_", "http_request_duration", "http_request_size",
                                                    "http_response_size"))}
    assert not {n for n in names if n.endswith("_created")}
    http = [r for r in rows if r.metric == "http_requests_total"]
    assert {r.labels["handler"] for r in http} == {"/v1/completions", "/v1/chat/completions"}
    assert sum(r.value for r in http) == 5 and {r.metric_type for r in http} == {"counter"}


def test_model_column_comes_from_the_label_when_not_configured_and_a_differing_label_is_kept():
    unconfigured = parse_metrics(METRICS_TEXT, replica="r", model="", ts=TS)
    assert {r.model for r in unconfigured} == {"tiny-llama"}  # also vllm:cache_config_info, which has no label
    assert all("model_name" not in r.labels for r in unconfigured)
    renamed = parse_metrics(METRICS_TEXT, replica="r", model="llama-8b", ts=TS)
    running = next(r for r in renamed if r.metric == "vllm:num_requests_running")
    assert running.model == "llama-8b" and running.labels == {"engine": "0", "model_name": "tiny-llama"}


def test_unparsable_text_raises():
    with pytest.raises(ValueError):
        parse_metrics("vllm:num_requests_running{engine=\"0\" 1\n", replica="r", model="m", ts=TS)


# --- scraping over HTTP ---------------------------------------------------------------------------

class _Replica(BaseHTTPRequestHandler):
    """A fake replica: /metrics answers the captured text, other paths misbehave on purpose."""

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/slow/metrics":
            time.sleep(SLOW_S)
        if path in ("/metrics", "/slow/metrics"):
            self._answer(200, METRICS_TEXT.encode())
        elif path == "/garbage/metrics":
            self._answer(200, b"<html>not prometheus{{{ 1 2 3</html>\n")
        else:
            self._answer(503, b"overloaded")

    def _answer(self, status: int, body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the scraper gave up on the slow answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def replica() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Replica)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def metrics_db(warehouse) -> WarehouseURL:
    migrate(warehouse.client(), RenderOptions(database="scrape_test"))
    return WarehouseURL.parse(f"{warehouse.url}/scrape_test")


def query(warehouse, sql: str, **parameters: object) -> list[tuple]:
    return warehouse.client(database="scrape_test").query(sql, parameters=parameters).result_rows


def test_one_tick_writes_healthy_replica_and_records_down_and_slow_ones_as_up_0(replica, warehouse, metrics_db):
    targets = [
        ScrapeTarget(replica="tick-healthy", url=replica, model="tiny-llama"),
        ScrapeTarget(replica="tick-down", url=f"http://127.0.0.1:{free_port()}", model="tiny-llama"),
        ScrapeTarget(replica="tick-slow", url=f"{replica}/slow/metrics", model="tiny-llama"),
    ]
    stats = ScrapeStats()
    scraper = MetricsScraper(targets, WarehouseWriter(metrics_db, stats=stats), interval_s=15, timeout_s=TIMEOUT_S,
                             stats=stats)
    started = time.monotonic()
    rows = asyncio.run(scraper.scrape_once(now=TS))
    assert time.monotonic() - started < SLOW_S, "the slow replica must not hold the tick past the timeout"

    up = dict(query(warehouse, "SELECT replica, value FROM fleet_metrics WHERE metric = 'up' "
                               "AND replica LIKE 'tick-%'"))
    assert up == {"tick-healthy": 1.0, "tick-down": 0.0, "tick-slow": 0.0}
    per_replica = dict(query(warehouse, "SELECT replica, count() FROM fleet_metrics WHERE replica LIKE 'tick-%' "
                                        "GROUP BY replica"))
    assert per_replica["tick-down"] == per_replica["tick-slow"] == 1
    assert per_replica["tick-healthy"] == len(rows) - 2 > 100
    assert stats.scrapes_ok == 1 and stats.scrapes_failed == 2
    assert stats.rows_written == len(rows) and stats.rows_buffered == 0 and stats.write_errors == 0

    (ts, model, kind, value), = query(
        warehouse, "SELECT ts, model, metric_type, value FROM fleet_metrics WHERE replica = 'tick-healthy' "
                   "AND metric = 'vllm:generation_tokens_total'")
    assert ts == TS.replace(tzinfo=None) and model == "tiny-llama" and kind == "counter" and value == 43
    inf_bucket = query(warehouse, "SELECT value FROM fleet_metrics WHERE replica = 'tick-healthy' "
                                  "AND metric = 'vllm:e2e_request_latency_seconds_bucket' AND labels['le'] = '+Inf'")
    assert inf_bucket == [(5.0,)]
    assert query(warehouse, "SELECT DISTINCT ts FROM fleet_metrics WHERE replica LIKE 'tick-%'") == [
        (TS.replace(tzinfo=None),)]


@pytest.mark.parametrize("path, reason", [("/broken/metrics", "HTTP 503"),
                                          ("/garbage/metrics", "unparsable metrics text")])
def test_non_200_and_unparsable_answers_are_down_and_logged_without_credentials(replica, caplog, path, reason):
    url = replica.replace("http://", "http://scraper:s3cret@") + path + "?token=abc"
    target = ScrapeTarget(replica="bad-0", url=url, model="m")

    async def scrape() -> list[MetricRow]:
        import httpx

        async with httpx.AsyncClient() as client:
            return await scrape_target(client, target, TIMEOUT_S, TS)

    with caplog.at_level(logging.WARNING, logger="fleetlens.collector.scrape"):
        rows = asyncio.run(scrape())
    assert rows == [MetricRow(TS, "bad-0", "m", "up", "gauge", {}, 0.0)]
    message = caplog.records[-1].getMessage()
    assert "bad-0" in message and reason in message
    assert "s3cret" not in message and "token=abc" not in message and "scraper" not in message


def test_rows_are_kept_while_the_warehouse_is_down_and_written_when_it_is_back(start_warehouse, tmp_path):
    port = free_port()  # nothing listens here yet: the warehouse is "down"
    stats = ScrapeStats()
    writer = WarehouseWriter(WarehouseURL.parse(f"http://127.0.0.1:{port}/scrape_buffer"), stats=stats)
    first = parse_metrics(METRICS_TEXT, replica="buf-0", model="tiny-llama", ts=TS)
    second = [r._replace(ts=TS.replace(second=15)) for r in first]
    assert writer(first) is False and writer(second) is False
    assert stats.write_errors == 2 and stats.rows_written == 0 and stats.rows_dropped == 0
    assert writer.buffered_rows == stats.rows_buffered == len(first) + len(second)

    wh = start_warehouse(path=tmp_path / "late", port=port)  # the warehouse comes (back) up on that port
    migrate(wh.client(), RenderOptions(database="scrape_buffer"))
    third = [r._replace(ts=TS.replace(second=30)) for r in first]
    assert writer(third) is True
    assert stats.rows_written == 3 * len(first) and stats.rows_buffered == writer.buffered_rows == 0
    counts = wh.client(database="scrape_buffer").query(
        "SELECT toSecond(ts), count() FROM fleet_metrics GROUP BY 1 ORDER BY 1").result_rows
    assert counts == [(0, len(first)), (15, len(first)), (30, len(first))]
    assert writer([]) is True and stats.rows_written == 3 * len(first)  # nothing pending, nothing re-sent
    writer.close()


def test_buffer_bound_drops_whole_oldest_batches_and_counts_them(warehouse, metrics_db, caplog):
    stats = ScrapeStats()
    writer = WarehouseWriter(WarehouseURL.parse(f"http://127.0.0.1:{free_port()}/scrape_test"), stats=stats,
                             max_buffered_rows=10)

    def batch(second: int) -> list[MetricRow]:
        return [MetricRow(TS.replace(second=second), "bound-0", "m", f"m{i}", "gauge", {}, float(i))
                for i in range(4)]

    with caplog.at_level(logging.WARNING, logger="fleetlens.collector.scrape"):
        for second in (1, 2, 3):
            assert writer(batch(second)) is False
    assert stats.rows_dropped == 4 and writer.buffered_rows == 8  # 12 > 10: the first batch went, whole
    assert any("dropped the oldest 4 rows" in r.getMessage() for r in caplog.records)
    writer.url = metrics_db  # pointed back at a live warehouse
    assert writer(batch(4)) is True
    assert stats.rows_written == 12 and stats.rows_dropped == 4
    seconds = query(warehouse, "SELECT DISTINCT toSecond(ts) FROM fleet_metrics WHERE replica = 'bound-0' ORDER BY 1")
    assert seconds == [(2,), (3,), (4,)]


async def run_until(scraper: MetricsScraper, done: Callable[[], bool], timeout_s: float = 8.0) -> None:
    """Run the loop until `done()` (or fail after `timeout_s`), then cancel it as the collector does."""
    task = asyncio.create_task(scraper.run())
    deadline = time.monotonic() + timeout_s
    while not done():
        assert not task.done(), task.exception()
        assert time.monotonic() < deadline, "the scraper loop stalled"
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_run_scrapes_on_a_fixed_schedule_until_cancelled(replica):
    ticks: list[list[MetricRow]] = []
    target = ScrapeTarget(replica="loop-0", url=replica, model="tiny-llama")
    scraper = MetricsScraper([target], ticks.append, interval_s=0.25, timeout_s=TIMEOUT_S)

    asyncio.run(run_until(scraper, lambda: len(ticks) >= 5))
    stamps = [rows[0].ts for rows in ticks]
    gaps = sorted((b - a).total_seconds() for a, b in itertools.pairwise(stamps))
    assert gaps[0] > 0.15, gaps  # never back to back, even after a slow tick
    assert 0.2 < gaps[len(gaps) // 2] < 0.35, gaps  # and on the 0.25 s schedule
    assert scraper.stats.scrapes_ok == len(ticks) and scraper.stats.scrapes_failed == 0
    families = {f.name: f for f in scraper.metric_families("fleetlens_collector_")}
    scrapes = {s.labels["outcome"]: s.value for s in families["fleetlens_collector_scrapes"].samples}
    assert scrapes == {"ok": len(ticks), "failed": 0}
    assert "fleetlens_collector_scrape_rows_dropped" in families
    assert "fleetlens_collector_scrape_rows_buffered" in families


def test_a_failing_writer_does_not_stop_the_loop(replica):
    calls: list[int] = []

    def flaky(rows: list[MetricRow]) -> None:
        calls.append(len(rows))
        raise RuntimeError("boom")

    scraper = MetricsScraper([ScrapeTarget(replica="loop-1", url=replica)], flaky, interval_s=0.1,
                             timeout_s=TIMEOUT_S)

    asyncio.run(run_until(scraper, lambda: len(calls) >= 3))
    assert all(n > 100 for n in calls)  # every tick still scraped and handed over its rows


def test_build_scraper_uses_the_collector_settings():
    settings = Settings(warehouse_url="http://default:pw@127.0.0.1:9/db", collector={
        "scrape_interval_s": 7, "scrape_timeout_s": 2,
        "scrape_targets": [{"replica": "llama-8b-0", "url": "http://10.0.0.5:8000", "model": "llama-8b"}],
    })
    scraper = build_scraper(settings, max_buffered_rows=123)
    assert scraper.interval_s == 7 and scraper.timeout_s == 2
    assert [t.metrics_url for t in scraper.targets] == ["http://10.0.0.5:8000/metrics"]
    assert isinstance(scraper.writer, WarehouseWriter) and scraper.writer.max_buffered_rows == 123
    assert scraper.writer.url.database == "db" and scraper.writer.stats is scraper.stats
    assert list(COLUMNS) == ["ts", "replica", "model", "metric", "metric_type", "labels", "value"]


# --- inside the collector process ----------------------------------------------------------------

def test_collector_process_scrapes_its_configured_replicas(replica, warehouse, start_collector):
    import json

    from conftest import migrated_database, wait_for

    url = migrated_database(warehouse, "scrape_in_collector")
    targets = [{"replica": "live-0", "url": replica, "model": "tiny-llama"},
               {"replica": "dead-0", "url": f"http://127.0.0.1:{free_port()}", "model": "tiny-llama"}]
    collector = start_collector(url, env={"FLEETLENS_COLLECTOR__SCRAPE_TARGETS": json.dumps(targets),
                                          "FLEETLENS_COLLECTOR__SCRAPE_INTERVAL_S": "0.5",
                                          "FLEETLENS_COLLECTOR__SCRAPE_TIMEOUT_S": "1"})
    client = warehouse.client(database="scrape_in_collector")

    def up_by_replica() -> dict[str, float]:
        rows = client.query("SELECT replica, max(value) FROM fleet_metrics WHERE metric = 'up' GROUP BY replica")
        return dict(rows.result_rows)

    assert wait_for(lambda: len(up_by_replica()) == 2 and up_by_replica()) == {"live-0": 1.0, "dead-0": 0.0}
    running = client.query("SELECT count() FROM fleet_metrics WHERE replica = 'live-0' "
                           "AND metric = 'vllm:num_requests_running'").result_rows[0][0]
    assert running >= 1
    metrics = collector.metrics()
    assert metrics['fleetlens_collector_scrapes_total{outcome="ok"}'] >= 1
    assert metrics['fleetlens_collector_scrapes_total{outcome="failed"}'] >= 1


def test_collector_scrapes_the_replicas_registered_on_this_machine(replica, warehouse, start_collector, tmp_path):
    """No scrape_targets: the replicas `fleetlens serve replica` registers (<data_dir>/replicas) are
    scraped from the tick after they register until the tick after they leave."""
    from conftest import migrated_database, wait_for
    from fleetlens.serving.registration import ReplicaDirectory, ReplicaRecord

    url = migrated_database(warehouse, "scrape_registered")
    directory = ReplicaDirectory(tmp_path / "replicas")
    start_collector(url, env={"FLEETLENS_REPLICA__REGISTRY_DIR": str(directory.path),
                              "FLEETLENS_COLLECTOR__SCRAPE_INTERVAL_S": "0.5"})
    client = warehouse.client(database="scrape_registered")

    def samples(name: str) -> int:
        return client.query("SELECT count() FROM fleet_metrics WHERE metric = 'up' AND value = 1 "
                            "AND replica = {r:String}", parameters={"r": name}).result_rows[0][0]

    time.sleep(1.5)
    assert samples("reg-0") == 0  # nothing registered, nothing scraped
    directory.register(ReplicaRecord(name="reg-0", model="tiny-llama", url=replica))
    wait_for(lambda: samples("reg-0") >= 2)
    model = client.query("SELECT any(model) FROM fleet_metrics WHERE replica = 'reg-0'").result_rows[0][0]
    assert model == "tiny-llama"
    directory.deregister("reg-0")
    time.sleep(1.2)  # a tick in flight may still write one more
    after = samples("reg-0")
    time.sleep(1.5)
    assert samples("reg-0") == after  # gone from the directory: no longer scraped


def test_scrape_registered_can_be_turned_off(tmp_path):
    settings = Settings(warehouse_url="http://default:pw@127.0.0.1:9/db", data_dir=tmp_path,
                        collector={"scrape_registered": False})
    assert build_scraper(settings).discover is None
    assert build_scraper(Settings(warehouse_url="http://default:pw@127.0.0.1:9/db", data_dir=tmp_path)).discover
