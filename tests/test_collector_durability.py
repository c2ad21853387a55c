"""The collector's "No loss" and "Overload" bars, end to end, with real processes.

No loss: with a client that retries as OTLP says, (a) `kill -9` of the collector mid-stream and a
restart, (b) the warehouse stopped for 30 s and restarted: every span sent is in ClickHouse
afterwards (count and a checksum over SpanIds). Duplicates from at-least-once delivery are allowed.

Overload: far beyond what the pipeline can drain, the collector's RSS stays under its configured
bound (plus a stated margin), senders get retryable answers, and nothing acknowledged is lost.

Every sender here is `otlp_sender.OtlpSender`: pre-built requests with unique random span ids,
retried on connection errors and retryable answers (honouring Retry-After / RetryInfo) until
acknowledged; it records each acknowledged span id. The checks compare those ids with what is in
`otel_traces`, in ClickHouse: missing ids, unexpected ids, distinct count and
`groupBitXor(cityHash64(SpanId))` on both sides.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import CollectorProcess, WarehouseProcess, free_port, migrated_database, wait_for
from otlp_sender import OtlpSender, build_requests

pytestmark = pytest.mark.timeout(300)

MiB = 1024**2
RETRYABLE_ANSWERS = {"429", "503", "grpc:RESOURCE_EXHAUSTED", "grpc:UNAVAILABLE"}
OK_ANSWERS = {"200", "grpc:OK"}


def report(test: str, **numbers: object) -> None:
    """The measured numbers, on stdout (shown with -s, and on failure)."""
    print(f"\n[{test}] " + ", ".join(f"{k}={v}" for k, v in numbers.items()), flush=True)


# ------------------------------------------------------------------ helpers
@dataclass
class Landed:
    expected: int  # distinct acknowledged span ids
    rows: int  # rows in otel_traces (duplicates included)
    distinct: int  # distinct SpanIds in otel_traces
    missing: int  # acknowledged, not in otel_traces
    unexpected: int  # in otel_traces, never sent
    checksum_expected: int
    checksum_landed: int

    @property
    def duplicates(self) -> int:
        return self.rows - self.distinct


def _scalar(client, sql: str) -> int:
    return int(client.query(sql).result_rows[0][0])


def load_expected(client, ids: set[str], table: str = "expected_span_ids") -> None:
    """The acknowledged span ids, into a table next to otel_traces, so ClickHouse compares both."""
    client.command(f"DROP TABLE IF EXISTS {table}")
    client.command(f"CREATE TABLE {table} (SpanId String) ENGINE = MergeTree ORDER BY SpanId")
    ordered = sorted(ids)
    for start in range(0, len(ordered), 50_000):
        client.insert(table, [[i] for i in ordered[start:start + 50_000]], column_names=["SpanId"])


def landed(client, table: str = "expected_span_ids", sent_table: str | None = None) -> Landed:
    """Compare otel_traces with the expected ids (in `table`); unexpected = not in `sent_table`."""
    sent_table = sent_table or table
    rows, distinct, checksum_landed = client.query(
        "SELECT sum(c), count(), groupBitXor(cityHash64(SpanId)) "
        "FROM (SELECT SpanId, count() AS c FROM otel_traces GROUP BY SpanId)"
    ).result_rows[0]
    expected, checksum_expected = client.query(
        f"SELECT count(), groupBitXor(cityHash64(SpanId)) FROM (SELECT DISTINCT SpanId FROM {table})"
    ).result_rows[0]
    missing = _scalar(client, f"SELECT count() FROM {table} "
                              "WHERE SpanId NOT IN (SELECT SpanId FROM otel_traces)")
    unexpected = _scalar(client, "SELECT count() FROM (SELECT DISTINCT SpanId FROM otel_traces) "
                                 f"WHERE SpanId NOT IN (SELECT SpanId FROM {sent_table})")
    return Landed(int(expected), int(rows or 0), int(distinct), missing, unexpected, int(checksum_expected),
                  int(checksum_landed))


def wait_all_landed(client, acked: set[str], timeout_s: float = 120.0,
                    sent: set[str] | None = None) -> Landed:
    """Wait until every acknowledged span id is in otel_traces; then the full comparison."""
    load_expected(client, acked)
    if sent is not None and sent != acked:
        load_expected(client, sent, "sent_span_ids")
    sent_table = "sent_span_ids" if sent is not None and sent != acked else None
    query = "SELECT count() FROM expected_span_ids WHERE SpanId NOT IN (SELECT SpanId FROM otel_traces)"
    deadline = time.monotonic() + timeout_s
    while _scalar(client, query) and time.monotonic() < deadline:
        time.sleep(0.5)
    return landed(client, sent_table=sent_table)


def assert_no_loss(result: Landed, *, exact: bool) -> None:
    """Every acknowledged span is in otel_traces; with `exact`, nothing else is either (same
    distinct count and checksum over SpanIds)."""
    assert result.missing == 0, f"{result.missing} acknowledged spans are not in otel_traces: {result}"
    assert result.unexpected == 0, f"otel_traces holds span ids that were never sent: {result}"
    if exact:
        assert result.distinct == result.expected, result
        assert result.checksum_landed == result.checksum_expected, result


def alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class RssSampler:
    """Samples the RSS of a process (alone, and with its children) every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self.peak_with_children = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = self.process.memory_info().rss
                total = rss
                for child in self.process.children(recursive=True):
                    try:
                        total += child.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.peak = max(self.peak, rss)
            self.peak_with_children = max(self.peak_with_children, total)
            self.samples += 1
            self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def rss_now(process: CollectorProcess) -> int:
    return psutil.Process(process.process.pid).memory_info().rss


@pytest.fixture(scope="module")
def idle_rss(tmp_path_factory: pytest.TempPathFactory) -> int:
    """The collector's main-process RSS when started and idle (nothing sent, warehouse absent)."""
    collector = CollectorProcess(f"http://default@127.0.0.1:{free_port()}/idle",
                                 tmp_path_factory.mktemp("idle") / "collector").start()
    try:
        time.sleep(1.0)
        samples = []
        for _ in range(5):
            samples.append(rss_now(collector))
            time.sleep(0.1)
        return max(samples)
    finally:
        collector.stop()


def warehouse_database(url: str) -> str:
    return url.rsplit("/", 1)[1]


# ------------------------------------------------------------ No loss (a): kill -9
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_kill9_mid_stream_loses_nothing(warehouse: WarehouseProcess, start_collector, protocol: str) -> None:
    """kill -9 of the collector's main process mid-stream, restart on the same spool and ports:
    every span the sender sent (it retries until acknowledged) is in otel_traces; the writer
    worker processes do not outlive their parent."""
    url = migrated_database(warehouse, f"durability_kill9_{protocol}")
    collector = start_collector(url)
    payloads = build_requests(400, 200)  # 80,000 spans
    target = collector.endpoint if protocol == "http" else f"127.0.0.1:{collector.grpc_port}"
    sender = OtlpSender(payloads, protocol=protocol, target=target, concurrency=4).start()
    started = time.monotonic()
    try:
        wait_for(lambda: sender.acked_requests >= 100 or sender.errors, timeout_s=120, interval_s=0.02)
        assert not sender.errors, sender.errors
        main = psutil.Process(collector.process.pid)
        children = main.children(recursive=True)
        assert children, "the collector should have writer worker processes by now"

        os.kill(main.pid, signal.SIGKILL)  # the main process only, as the OOM killer would
        collector.process.wait(10)
        acked_at_kill = sender.acked_requests
        killed_at = time.monotonic()
        # Orphaned writers notice their parent is gone and exit (they check every second).
        wait_for(lambda: not any(alive(child) for child in children), timeout_s=15)
        orphans_gone_s = time.monotonic() - killed_at
        time.sleep(max(0.0, 1.0 - orphans_gone_s))  # down for at least a second; the sender keeps retrying

        restarted = start_collector(url, data_dir=collector.data_dir, grpc_port=collector.grpc_port,
                                    http_port=collector.http_port)
        down_s = time.monotonic() - killed_at
        assert sender.join(180), f"sender did not finish: {sender.stats.snapshot()}"
    finally:
        sender.close()
    stats = sender.stats.snapshot()
    assert not sender.errors, sender.errors
    assert 0 < acked_at_kill < len(payloads), "the kill must land mid-stream"
    assert sender.all_acked, stats
    assert stats["permanent_failures"] == [] and stats["partial_rejections"] == 0, stats
    assert sum(stats["transport_errors"].values()) > 0, f"the sender never saw the collector gone: {stats}"

    acked = sender.acked_ids()
    assert acked == sender.sent_span_ids and len(acked) == 80_000
    client = warehouse.client(database=warehouse_database(url))
    result = wait_all_landed(client, acked)
    assert_no_loss(result, exact=True)
    metrics = restarted.metrics()
    report(f"kill9-{protocol}", spans_sent=len(acked), acked_requests_at_kill=acked_at_kill,
           rows=result.rows, duplicates=result.duplicates, replayed_after_restart=metrics.get(
               "fleetlens_collector_replayed_spans_total"), writer_children=len(children),
           orphans_gone_s=round(orphans_gone_s, 2), down_s=round(down_s, 2),
           transport_errors=stats["transport_errors"], answers=stats["answers"],
           duration_s=round(time.monotonic() - started, 1))


# -------------------------------------------------- No loss (b): warehouse down for 30 s
OUTAGE_S = 30.0


def test_warehouse_down_30s_loses_nothing(start_warehouse, start_collector) -> None:
    """The warehouse is stopped (SIGTERM) for 30 s mid-stream and started again: the collector
    keeps acknowledging (the spool takes it), reports the warehouse down and the spool growing, and
    afterwards every span sent is in otel_traces and the spool is empty again."""
    wh = start_warehouse()
    url = migrated_database(wh, "durability_wh_down")
    collector = start_collector(url, env={"FLEETLENS_COLLECTOR__RETRY_MAX_S": "2"})
    payloads = build_requests(800, 100)  # 80,000 spans, paced to last ~40 s
    sender = OtlpSender(payloads, protocol="http", target=collector.endpoint, concurrency=2,
                        pause_s=0.1).start()
    started = time.monotonic()
    warehouse_up: list[float] = []
    spool_bytes: list[float] = []
    try:
        wait_for(lambda: sender.acked_requests >= 40, timeout_s=60)
        wh.stop()  # SIGTERM, waits for the process to exit
        down_from = time.monotonic()
        while time.monotonic() - down_from < OUTAGE_S:
            metrics = collector.metrics()
            warehouse_up.append(metrics["fleetlens_collector_warehouse_up"])
            spool_bytes.append(metrics["fleetlens_collector_spool_bytes"])
            time.sleep(1.0)
        down_until = time.monotonic()
        acked_at_restart = sender.acked_requests
        wh.start()
        assert sender.join(180), f"sender did not finish: {sender.stats.snapshot()}"
    finally:
        sender.close()
    stats = sender.stats.snapshot()
    assert not sender.errors, sender.errors
    assert sender.all_acked, stats
    acks_while_down = sum(1 for t in sender.stats.ack_times if down_from <= t <= down_until)
    # Nothing but 200s: the spool takes everything while the warehouse is away.
    assert set(stats["answers"]) == {"200"} and not stats["transport_errors"], stats
    assert acks_while_down >= 50, f"only {acks_while_down} requests acknowledged during the outage"
    assert acked_at_restart < len(payloads), "the stream should go on after the warehouse is back"
    assert min(warehouse_up) == 0.0, f"warehouse_up never went to 0: {warehouse_up}"
    assert max(spool_bytes) > 0, spool_bytes

    acked = sender.acked_ids()
    assert acked == sender.sent_span_ids
    result = wait_all_landed(wh.client(database="durability_wh_down"), acked)
    assert_no_loss(result, exact=True)
    wait_for(lambda: collector.metrics()["fleetlens_collector_spool_bytes"] == 0, timeout_s=60)
    final = collector.metrics()
    assert final["fleetlens_collector_warehouse_up"] == 1.0
    report("warehouse-down-30s", spans_sent=len(acked), rows=result.rows, duplicates=result.duplicates,
           acks_while_down=acks_while_down, peak_spool_bytes=int(max(spool_bytes)),
           write_errors=final["fleetlens_collector_write_errors_total"],
           duration_s=round(time.monotonic() - started, 1))


# --------------------------------------------------------------------- Overload
OVERLOAD_S = 20.0


def test_overload_bounded_rss_retryable_answers_nothing_acked_lost(idle_rss: int, start_collector,
                                                                   start_warehouse, tmp_path: Path) -> None:
    """32 concurrent senders (HTTP and gRPC) push ~450 KB requests for 20 s at a collector whose
    warehouse is down, with a small memory limit, queue and spool: the senders only ever get 200s
    or retryable answers that carry a delay (no other errors, no connection-reset storm), the
    collector's RSS stays under its memory limit plus a stated margin, /health keeps answering;
    once the warehouse is there, every acknowledged span lands and the spool empties."""
    memory_limit = idle_rss + 48 * MiB
    max_concurrent, max_request = 16, 1 * MiB
    # In-flight requests are admitted before the RSS they cause is seen (RSS is read every 0.1 s):
    # allow each admitted request's body plus its decoded copy, twice over.
    margin = 4 * max_concurrent * max_request
    spool_max = 20 * MiB
    wh_port = free_port()
    url = f"http://default@127.0.0.1:{wh_port}/durability_overload"  # nothing listens there yet
    collector = start_collector(url, env={
        "FLEETLENS_COLLECTOR__MEMORY_LIMIT_BYTES": str(memory_limit),
        "FLEETLENS_COLLECTOR__QUEUE_MAX_BYTES": str(2 * MiB),
        "FLEETLENS_COLLECTOR__SPOOL_MAX_BYTES": str(spool_max),
        "FLEETLENS_COLLECTOR__MAX_CONCURRENT_REQUESTS": str(max_concurrent),
        "FLEETLENS_COLLECTOR__MAX_REQUEST_BYTES": str(max_request),
        "FLEETLENS_COLLECTOR__RETRY_MAX_S": "2",
    })
    payloads = build_requests(160, 200, padding_bytes=2000)  # ~450 KB each
    request_bytes = len(payloads[0].body)
    assert request_bytes < max_request
    # Senders honour Retry-After / RetryInfo up to 1 s (the spool-full hint is 5 s).
    http = OtlpSender(payloads[:120], protocol="http", target=collector.endpoint, concurrency=24,
                      retry_after_cap_s=1.0)
    grpc_ = OtlpSender(payloads[120:], protocol="grpc", target=f"127.0.0.1:{collector.grpc_port}",
                       concurrency=8, retry_after_cap_s=1.0)
    sampler = RssSampler(collector.process.pid).start()
    health: list[int | str] = []
    http.start(), grpc_.start()
    started = time.monotonic()
    try:
        while time.monotonic() - started < OVERLOAD_S:
            time.sleep(1.0)
            try:
                health.append(httpx.get(collector.endpoint + "/health", timeout=10).status_code)
            except httpx.HTTPError as error:
                health.append(repr(error))
        during = collector.metrics()
    finally:
        http.stop(), grpc_.stop()
        joined = http.join(60) and grpc_.join(60)
        sampler.stop()
    blast_s = time.monotonic() - started
    assert joined, "senders did not stop"

    stats = {"http": http.stats.snapshot(), "grpc": grpc_.stats.snapshot()}
    assert not http.errors and not grpc_.errors, (http.errors, grpc_.errors)
    answers: dict[str, int] = {}
    for s in stats.values():
        for answer, n in s["answers"].items():
            answers[answer] = answers.get(answer, 0) + n
        assert s["permanent_failures"] == [] and s["partial_rejections"] == 0, s
        assert s["refused_without_delay"] == 0, f"a refusal came without Retry-After/RetryInfo: {s}"
    refused = sum(n for a, n in answers.items() if a in RETRYABLE_ANSWERS)
    attempts = sum(s["attempts"] for s in stats.values())
    transport_errors = sum(sum(s["transport_errors"].values()) for s in stats.values())
    assert set(answers) <= OK_ANSWERS | RETRYABLE_ANSWERS, answers
    acked_requests = http.acked_requests + grpc_.acked_requests
    assert acked_requests > 0 and refused > 0, answers
    # The offered load is what the senders tried to hand over; the collector could take (spool)
    # only a tenth of it or less, and drained nothing.
    assert attempts >= 10 * acked_requests, f"not an overload: {attempts} attempts, {acked_requests} accepted"
    assert {"429", "503"} & set(stats["http"]["answers"]), stats["http"]
    assert {"grpc:RESOURCE_EXHAUSTED", "grpc:UNAVAILABLE"} & set(stats["grpc"]["answers"]), stats["grpc"]
    assert transport_errors <= max(3, attempts // 100), f"connection errors under load: {stats}"
    assert health and all(h == 200 for h in health), health
    assert during["fleetlens_collector_warehouse_up"] == 0.0
    assert during["fleetlens_collector_spool_bytes"] <= spool_max
    assert sampler.samples > 10
    assert sampler.peak <= memory_limit + margin, (
        f"collector RSS peaked at {sampler.peak / MiB:.0f} MiB; bound {memory_limit / MiB:.0f} MiB "
        f"+ {margin / MiB:.0f} MiB margin")

    # The warehouse arrives: everything acknowledged lands, the spool empties.
    acked = http.acked_ids() | grpc_.acked_ids()
    sent = http.sent_span_ids | grpc_.sent_span_ids
    assert acked
    wh = start_warehouse(path=tmp_path / "overload-warehouse", port=wh_port)
    migrated_database(wh, "durability_overload")
    result = wait_all_landed(wh.client(database="durability_overload"), acked, sent=sent)
    assert_no_loss(result, exact=False)
    wait_for(lambda: collector.metrics()["fleetlens_collector_spool_bytes"] == 0, timeout_s=60)
    # Once the load is gone the collector takes data again -- unless its RSS stays over the memory
    # limit: memory freed after a burst is not always handed back to the OS, and the limiter then
    # refuses everything, idle or not (reported as a collector issue; warned about here, not failed).
    after = OtlpSender(build_requests(5, 50), protocol="http", target=collector.endpoint,
                       retry_after_cap_s=1.0).start()
    after.join(15)
    after.close()
    rss_after = rss_now(collector)
    if not after.all_acked:
        assert rss_after > memory_limit, f"collector refuses data after the overload: {after.stats.snapshot()}"
        assert set(after.stats.snapshot()["answers"]) == {"503"}, after.stats.snapshot()
        warnings.warn(f"collector stays over its memory limit after the overload, idle, spool empty "
                      f"(RSS {rss_after / MiB:.0f} MiB > {memory_limit / MiB:.0f} MiB) and refuses all data")
    refusals = {k.split("{", 1)[1].rstrip("}"): v for k, v in during.items()
                if k.startswith("fleetlens_collector_refused_requests_total{")}
    report("overload", idle_rss_mib=round(idle_rss / MiB), memory_limit_mib=round(memory_limit / MiB),
           margin_mib=round(margin / MiB), peak_rss_mib=round(sampler.peak / MiB),
           peak_rss_with_children_mib=round(sampler.peak_with_children / MiB), blast_s=round(blast_s, 1),
           attempts=attempts, offered_mib_s=round(attempts * request_bytes / MiB / blast_s, 1),
           acked_requests=acked_requests, acked_spans=len(acked),
           offered_x=round(attempts / acked_requests, 1),
           answers=answers, refusal_reasons_during_blast=refusals, transport_errors=transport_errors,
           rows=result.rows, duplicates=result.duplicates, sent_not_acked_landed=result.distinct - len(acked),
           rss_after_drain_mib=round(rss_after / MiB), takes_data_again=after.all_acked)


def test_memory_limiter_refuses_retryably_and_bounds_rss(idle_rss: int, warehouse: WarehouseProcess,
                                                         start_collector) -> None:
    """A memory limit at the idle RSS: once RSS is over it, HTTP senders get 503 +
    Retry-After and gRPC senders UNAVAILABLE + RetryInfo (reason memory_limit), RSS stays within
    the limit plus the in-flight margin, and what was acknowledged before lands."""
    memory_limit = idle_rss  # any growth past idle trips the limiter while requests are in flight
    max_concurrent, max_request = 8, 1 * MiB
    margin = 4 * max_concurrent * max_request
    url = migrated_database(warehouse, "durability_memory_limit")
    collector = start_collector(url, env={
        "FLEETLENS_COLLECTOR__MEMORY_LIMIT_BYTES": str(memory_limit),
        "FLEETLENS_COLLECTOR__MAX_CONCURRENT_REQUESTS": str(max_concurrent),
        "FLEETLENS_COLLECTOR__MAX_REQUEST_BYTES": str(max_request),
    })
    # more requests than the test needs: both senders must still be sending once RSS is over the limit
    payloads = build_requests(240, 200, padding_bytes=2000)
    http = OtlpSender(payloads[:160], protocol="http", target=collector.endpoint, concurrency=6,
                      retry_after_cap_s=1.0)
    grpc_ = OtlpSender(payloads[160:], protocol="grpc", target=f"127.0.0.1:{collector.grpc_port}",
                       concurrency=2, retry_after_cap_s=1.0)
    sampler = RssSampler(collector.process.pid).start()
    http.start(), grpc_.start()
    key = 'fleetlens_collector_refused_requests_total{protocol="%s",reason="memory_limit"}'
    try:
        wait_for(lambda: (m := collector.metrics()).get(key % "http", 0) >= 3 and m.get(key % "grpc", 0) >= 1,
                 timeout_s=60, interval_s=0.5)
    finally:
        http.stop(), grpc_.stop()
        joined = http.join(60) and grpc_.join(60)
        sampler.stop()
    assert joined, "senders did not stop"
    stats = {"http": http.stats.snapshot(), "grpc": grpc_.stats.snapshot()}
    assert not http.errors and not grpc_.errors
    http_s, grpc_s = stats["http"], stats["grpc"]
    assert http_s["answers"].get("503", 0) >= 3 and 2.0 in http_s["retry_after_s"], http_s
    assert grpc_s["answers"].get("grpc:UNAVAILABLE", 0) >= 1 and 2.0 in grpc_s["retry_after_s"], grpc_s
    for s in stats.values():
        assert set(s["answers"]) <= OK_ANSWERS | RETRYABLE_ANSWERS and not s["permanent_failures"], s
        assert s["refused_without_delay"] == 0, s
    assert sampler.peak <= memory_limit + margin, (
        f"collector RSS peaked at {sampler.peak / MiB:.0f} MiB; bound {memory_limit / MiB:.0f} MiB "
        f"+ {margin / MiB:.0f} MiB margin")
    acked = http.acked_ids() | grpc_.acked_ids()
    result = wait_all_landed(warehouse.client(database="durability_memory_limit"), acked,
                             sent=http.sent_span_ids | grpc_.sent_span_ids)
    assert_no_loss(result, exact=False)
    report("memory-limit", idle_rss_mib=round(idle_rss / MiB), memory_limit_mib=round(memory_limit / MiB),
           peak_rss_mib=round(sampler.peak / MiB), margin_mib=round(margin / MiB),
           acked_requests=http.acked_requests + grpc_.acked_requests,
           answers={p: s["answers"] for p, s in stats.items()}, rss_after_mib=round(rss_now(collector) / MiB))


# -------------------------------------------------------------- drop_oldest policy
def test_drop_oldest_counts_and_logs_dropped_spans(warehouse: WarehouseProcess, start_collector) -> None:
    """spool_full_policy=drop_oldest with the warehouse unusable (its database does not exist yet)
    and a 1 MiB spool: senders keep getting 200, the oldest segments are dropped, and every
    acknowledged span that never reaches otel_traces is counted in dropped_spans_total and logged;
    the newest data is kept and lands once the database exists."""
    database = "durability_drop_oldest"
    warehouse.client().command(f"DROP DATABASE IF EXISTS {database}")
    url = f"http://default@127.0.0.1:{warehouse.port}/{database}"
    spool_max, segment = 1 * MiB, 256 * 1024  # a request is ~40 KB: ~7 records a segment
    collector = start_collector(url, env={
        "FLEETLENS_COLLECTOR__SPOOL_FULL_POLICY": "drop_oldest",
        "FLEETLENS_COLLECTOR__SPOOL_MAX_BYTES": str(spool_max),
        "FLEETLENS_COLLECTOR__SPOOL_SEGMENT_BYTES": str(segment),
        "FLEETLENS_COLLECTOR__RETRY_MAX_S": "1",
        # Segments the writer has read (in flight, retried) are never dropped: keep its read-ahead
        # (2 x workers batches) small so the bound can be checked.
        "FLEETLENS_COLLECTOR__BATCH_MAX_SPANS": "400",
    })
    payloads = build_requests(80, 200)  # ~3.2 MB in all, three times the spool bound
    sender = OtlpSender(payloads, protocol="http", target=collector.endpoint).start()
    assert sender.join(120), sender.stats.snapshot()
    stats = sender.stats.snapshot()
    assert sender.all_acked and set(stats["answers"]) == {"200"}, stats
    metrics = collector.metrics()
    dropped = int(metrics["fleetlens_collector_dropped_spans_total"])
    assert dropped > 0, metrics
    assert metrics["fleetlens_collector_spool_bytes"] <= spool_max, metrics
    # (warehouse_up is 1 until a first write has failed; under load that can come after the sender is done)
    wait_for(lambda: collector.metrics()["fleetlens_collector_warehouse_up"] == 0.0, timeout_s=60)
    log_text = collector.log_path.read_text()
    assert "dropped segment" in log_text and "spans)" in log_text, log_text[-2000:]

    # The database appears: what was kept lands; what is missing is exactly what was counted.
    migrated_database(warehouse, database)
    wait_for(lambda: collector.metrics()["fleetlens_collector_spool_bytes"] == 0, timeout_s=60)
    acked = sender.acked_ids()
    client = warehouse.client(database=database)
    load_expected(client, acked)
    result = landed(client)
    assert result.unexpected == 0, result
    assert result.missing > 0, "drop_oldest dropped spans, so some acknowledged spans cannot be there"
    assert result.missing <= dropped, f"{result.missing} spans lost but only {dropped} counted as dropped"
    newest = set(payloads[-1].span_ids)
    assert _scalar(client, "SELECT count(DISTINCT SpanId) FROM otel_traces WHERE SpanId IN (%s)"
                   % ",".join(f"'{i}'" for i in newest)) == len(newest), "the newest data must be kept"
    report("drop-oldest", acked_spans=len(acked), dropped_counted=dropped, missing=result.missing,
           landed_distinct=result.distinct, duplicates=result.duplicates,
           log_lines=log_text.count("dropped segment"))
