"""vLLM Prometheus `/metrics` scraper: every replica, every interval, into `fleet_metrics`.

Traces say what each request did; these samples say what each replica was doing (queue depth,
KV-cache use, token counters, latency histograms), including while no request of ours was traced.
One row per Prometheus sample, as Prometheus exposes it (histograms as `_bucket`/`_sum`/`_count`),
so queries can use the usual rate()/histogram-quantile arithmetic over (replica, metric, labels).

Pieces, one job each:

- `parse_metrics`: Prometheus text → rows (pure, no I/O).
- `scrape_target`: one replica → rows; never raises. A replica that does not answer within the
  timeout, answers non-200 or answers text that does not parse yields one row `up = 0`; a good
  scrape yields `up = 1` plus its samples. "Down" is data, not a gap.
- `WarehouseWriter`: rows → columnar insert; keeps rows (bounded) while the warehouse is down.
- `MetricsScraper`: the loop that scrapes all targets concurrently every interval.

What is kept: every `vllm:` family, plus `http_requests_total` (the API server's request count by
handler and status class; a 4xx/5xx never reaches vLLM's engine counters, so this is where error
rates come from). Dropped: `python_*`/`process_*` (they describe the API server process only, not
the engine core that holds the memory), the HTTP latency histograms (vLLM's own latency histograms
are finer) and the `*_created` series (series creation times, not measurements).

Labels: `model_name` is dropped when it equals the row's `model` column (the configured served
model name, or `model_name` itself when the target configures none), so it is kept exactly when it
says something new. `engine` (the data-parallel engine index) is kept: with several engines per
replica the series differ only by it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import httpx
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from fleetlens.config import ScrapeTarget, Settings, WarehouseURL
from fleetlens.warehouse.client import connect

log = logging.getLogger(__name__)

TABLE = "fleet_metrics"
COLUMNS = ("ts", "replica", "model", "metric", "metric_type", "labels", "value")
UP = "up"
KEEP_PREFIX = "vllm:"
KEEP_FAMILIES = frozenset({"http_requests"})  # family names as the parser gives them (counters lose _total)
MODEL_LABEL = "model_name"
# Ask for the classic text format: the parser below reads it, and OpenMetrics adds nothing we keep.
ACCEPT = "text/plain;version=0.0.4;q=1.0, */*;q=0.1"
DEFAULT_MAX_BUFFERED_ROWS = 200_000


class MetricRow(NamedTuple):
    """One `fleet_metrics` row; field order is the table's column order (COLUMNS)."""

    ts: datetime
    replica: str
    model: str
    metric: str
    metric_type: str
    labels: dict[str, str]
    value: float


@dataclass
class ScrapeStats:
    """Plain counters the collector's own /metrics reads (see `MetricsScraper.metric_families`)."""

    scrapes_ok: int = 0
    scrapes_failed: int = 0
    rows_written: int = 0
    rows_dropped: int = 0
    write_errors: int = 0
    rows_buffered: int = 0  # a gauge: rows waiting for the warehouse right now
    ticks_skipped: int = 0  # intervals missed because a tick (scrape + write) ran longer than the interval


def up_row(ts: datetime, replica: str, model: str, up: bool) -> MetricRow:
    return MetricRow(ts, replica, model, UP, "gauge", {}, 1.0 if up else 0.0)


def _kept(family_name: str) -> bool:
    return family_name.startswith(KEEP_PREFIX) or family_name in KEEP_FAMILIES


def parse_metrics(text: str, *, replica: str, model: str, ts: datetime) -> list[MetricRow]:
    """Rows for the kept samples of one /metrics answer (without the `up` row).

    `model` fills the `model` column; when it is empty, each sample's own `model_name` label does
    (and, for samples without one, the model the replica's other samples name).
    Raises ValueError when the text is not Prometheus text format (the caller counts that as down).
    """
    families = list(text_string_to_metric_families(text))  # parse it all first: all or nothing
    # `x_created` gauges next to a counter/histogram/summary `x` are creation times, not data.
    created = {f.name + "_created" for f in families if f.type in ("counter", "histogram", "summary")}
    kept = [f for f in families if _kept(f.name) and f.name not in created]
    # A replica serves one model: samples without the label (vllm:cache_config_info) get the one the others name.
    replica_model = model or next((s.labels[MODEL_LABEL] for f in kept for s in f.samples if MODEL_LABEL in s.labels),
                                  "")
    rows: list[MetricRow] = []
    for family in kept:
        for sample in family.samples:
            if sample.name.endswith("_created") and family.type != "gauge":
                continue  # OpenMetrics-style parsers attach _created to the family itself
            labels = dict(sample.labels)
            row_model = model or labels.get(MODEL_LABEL, replica_model)
            if labels.get(MODEL_LABEL) == row_model:
                del labels[MODEL_LABEL]
            rows.append(MetricRow(ts, replica, row_model, sample.name, family.type, labels, float(sample.value)))
    return rows


def safe_url(url: str) -> str:
    """`url` as it may be logged: no credentials, no query string."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _reason(error: BaseException) -> str:
    """Why a scrape failed, in words that never repeat the URL (httpx puts it in some messages)."""
    if isinstance(error, (TimeoutError, httpx.TimeoutException)):
        return "timed out"
    if isinstance(error, httpx.ConnectError):
        return f"cannot connect ({type(error).__name__})"
    if isinstance(error, httpx.HTTPError):
        return f"HTTP error ({type(error).__name__})"
    if isinstance(error, (ValueError, UnicodeDecodeError)):
        return f"unparsable metrics text: {str(error)[:200]}"
    return type(error).__name__


async def scrape_target(client: httpx.AsyncClient, target: ScrapeTarget, timeout: float,
                        now: datetime) -> list[MetricRow]:
    """Scrape one replica. Never raises: failures become a single `up = 0` row (and a warning).

    `timeout` bounds the whole exchange (connect, headers, body), not each read: a replica that
    dribbles its answer counts as down, as Prometheus would count it. `now` is the tick's time,
    shared by every target of a tick so their rows line up.
    """
    try:
        async with asyncio.timeout(timeout):
            response = await client.get(target.metrics_url, headers={"Accept": ACCEPT})
            if response.status_code != 200:
                raise _BadStatus(response.status_code)
            text = response.text
        rows = parse_metrics(text, replica=target.replica, model=target.model, ts=now)
    except asyncio.CancelledError:
        raise
    except _BadStatus as error:
        log.warning("scrape of replica %s (%s) failed: HTTP %d", target.replica, safe_url(target.metrics_url),
                    error.status)
        return [up_row(now, target.replica, target.model, False)]
    except Exception as error:  # noqa: BLE001 — any failure of one replica is that replica being down
        log.warning("scrape of replica %s (%s) failed: %s", target.replica, safe_url(target.metrics_url),
                    _reason(error))
        return [up_row(now, target.replica, target.model, False)]
    return [up_row(now, target.replica, target.model, True), *rows]


class _BadStatus(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def is_up(rows: Iterable[MetricRow]) -> bool:
    """Whether a `scrape_target` result is a successful scrape (its `up` row says 1)."""
    return any(row.metric == UP and row.value == 1.0 for row in rows)


def to_columns(rows: list[MetricRow]) -> list[list[Any]]:
    """Column-oriented data for clickhouse-connect's insert, in COLUMNS order."""
    if not rows:
        return [[] for _ in COLUMNS]
    return [list(column) for column in zip(*rows, strict=True)]


class WarehouseWriter:
    """Inserts rows into `fleet_metrics`; while the warehouse is down, keeps them for the next call.

    Kept rows are bounded by `max_buffered_rows`. Past the bound whole scrape batches are dropped,
    oldest first (a partial batch could leave a histogram with half its buckets), counted in
    `stats.rows_dropped` and logged; newer data is worth more than older data to a dashboard.
    The bound only applies while writes fail: a batch always gets one attempt to be written.

    Called from a worker thread (clickhouse-connect is blocking), one call at a time; a lock keeps
    it safe if that ever changes.
    """

    def __init__(self, url: WarehouseURL, *, stats: ScrapeStats | None = None,
                 max_buffered_rows: int = DEFAULT_MAX_BUFFERED_ROWS, timeout_s: float = 10.0,
                 table: str = TABLE) -> None:
        if max_buffered_rows < 0:
            raise ValueError("max_buffered_rows must be >= 0")
        self.url = url
        self.stats = stats if stats is not None else ScrapeStats()
        self.max_buffered_rows = max_buffered_rows
        self.timeout_s = timeout_s
        self.table = table
        self._pending: deque[list[MetricRow]] = deque()
        self._pending_rows = 0
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def buffered_rows(self) -> int:
        return self._pending_rows

    def __call__(self, rows: list[MetricRow]) -> bool:
        """Write `rows` (after anything still buffered). True when everything is in the warehouse."""
        with self._lock:
            if rows:
                self._pending.append(rows)
                self._pending_rows += len(rows)
            if not self._pending:
                return True
            try:
                self._insert([row for batch in self._pending for row in batch])
            except Exception as error:  # noqa: BLE001 — any failure: keep the rows, retry next call
                self._client = None  # reconnect next time: the server may have restarted
                self.stats.write_errors += 1
                self._trim()
                self.stats.rows_buffered = self._pending_rows
                log.warning("fleet_metrics write to %s failed (%s: %s); %d rows kept for the next try",
                            self.url.redacted(), type(error).__name__, str(error)[:200], self._pending_rows)
                return False
            self.stats.rows_written += self._pending_rows
            self._pending.clear()
            self._pending_rows = 0
            self.stats.rows_buffered = 0
            return True

    def _insert(self, rows: list[MetricRow]) -> None:
        if self._client is None:
            self._client = connect(self.url, connect_timeout=self.timeout_s, send_receive_timeout=self.timeout_s)
        self._client.insert(self.table, to_columns(rows), column_names=list(COLUMNS), column_oriented=True)

    def _trim(self) -> None:
        dropped = 0
        while self._pending and self._pending_rows > self.max_buffered_rows:
            batch = self._pending.popleft()
            self._pending_rows -= len(batch)
            dropped += len(batch)
        if dropped:
            self.stats.rows_dropped += dropped
            log.warning("fleet_metrics buffer over %d rows: dropped the oldest %d rows", self.max_buffered_rows,
                        dropped)

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


Writer = Callable[[list[MetricRow]], Any]


class MetricsScraper:
    """Scrapes every target concurrently each `interval_s` and hands the tick's rows to `writer`.

    Ticks are on a fixed schedule (start + k·interval), so rows from different replicas and
    different ticks line up; a tick that overruns the interval skips the missed ticks (counted)
    instead of firing them back to back. `writer` is a blocking callable (the warehouse client is
    blocking); it runs in a worker thread so a slow warehouse never stalls the event loop.
    """

    def __init__(self, targets: list[ScrapeTarget], writer: Writer, *, interval_s: float, timeout_s: float,
                 stats: ScrapeStats | None = None, client: httpx.AsyncClient | None = None,
                 discover: Callable[[], list[ScrapeTarget]] | None = None) -> None:
        self.targets = list(targets)
        self.discover = discover  # more targets, looked up again every tick (registered replicas)
        self.writer = writer
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.stats = stats if stats is not None else ScrapeStats()
        self._client = client

    async def scrape_once(self, now: datetime | None = None) -> list[MetricRow]:
        """One tick: scrape all targets, count outcomes, write. Returns the tick's rows."""
        now = now or datetime.now(UTC)
        client = self._client or httpx.AsyncClient()
        try:
            targets = await asyncio.to_thread(self.current_targets) if self.discover else self.targets
            results = await asyncio.gather(*(scrape_target(client, t, self.timeout_s, now) for t in targets))
        finally:
            if client is not self._client:
                await client.aclose()
        rows: list[MetricRow] = []
        for result in results:
            if is_up(result):
                self.stats.scrapes_ok += 1
            else:
                self.stats.scrapes_failed += 1
            rows.extend(result)
        await asyncio.to_thread(self.writer, rows)
        return rows

    def current_targets(self) -> list[ScrapeTarget]:
        """The configured targets, then the discovered ones not already configured (by replica name)."""
        targets = list(self.targets)
        if self.discover is not None:
            try:
                found = self.discover()
            except OSError as error:  # an unreadable directory: scrape what is configured, say why
                log.warning("could not look up registered replicas: %s", error)
                found = []
            named = {t.replica for t in targets}
            targets += [t for t in found if t.replica not in named]
        return targets

    async def run(self) -> None:
        """Scrape until cancelled."""
        owns_client = self._client is None
        if owns_client:
            # One pooled client for the loop's lifetime: keep-alive connections to every replica.
            self._client = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=max(len(self.targets), 8)))
        loop = asyncio.get_running_loop()
        start = loop.time()
        tick = 0
        try:
            while True:
                try:
                    await self.scrape_once()
                except Exception:  # a writer that raises must not end the loop: next tick tries again
                    log.exception("scrape tick failed")
                tick += 1
                due = start + tick * self.interval_s
                now = loop.time()
                if now > due:  # overran: skip to the next tick still ahead of us
                    missed = math.floor((now - due) / self.interval_s) + 1
                    self.stats.ticks_skipped += missed
                    log.warning("scrape tick took longer than the %.1f s interval; skipped %d tick(s)",
                                self.interval_s, missed)
                    tick += missed
                    due = start + tick * self.interval_s
                await asyncio.sleep(due - loop.time())
        finally:
            if owns_client and self._client is not None:
                await self._client.aclose()
                self._client = None

    def metric_families(self, prefix: str) -> Iterator[Any]:
        """The scraper's counters as Prometheus families, for the collector's own /metrics."""
        s = self.stats
        scrapes = CounterMetricFamily(prefix + "scrapes", "vLLM /metrics scrapes, by outcome", labels=["outcome"])
        scrapes.add_metric(["ok"], s.scrapes_ok)
        scrapes.add_metric(["failed"], s.scrapes_failed)
        yield scrapes
        yield CounterMetricFamily(prefix + "scrape_rows_written", "fleet_metrics rows inserted", value=s.rows_written)
        yield CounterMetricFamily(prefix + "scrape_rows_dropped",
                                  "fleet_metrics rows dropped because the buffer was full while the warehouse was down",
                                  value=s.rows_dropped)
        yield CounterMetricFamily(prefix + "scrape_write_errors", "Failed fleet_metrics inserts (rows kept, retried)",
                                  value=s.write_errors)
        yield CounterMetricFamily(prefix + "scrape_ticks_skipped", "Scrape intervals missed because a tick overran",
                                  value=s.ticks_skipped)
        yield GaugeMetricFamily(prefix + "scrape_rows_buffered", "fleet_metrics rows waiting for the warehouse",
                                value=s.rows_buffered)


def build_scraper(settings: Settings, *, max_buffered_rows: int = DEFAULT_MAX_BUFFERED_ROWS) -> MetricsScraper:
    """The scraper the collector runs: its settings' targets, written to its settings' warehouse."""
    config = settings.collector
    stats = ScrapeStats()
    writer = WarehouseWriter(settings.warehouse, stats=stats, max_buffered_rows=max_buffered_rows,
                             timeout_s=max(config.scrape_timeout_s, 5.0))
    discover = registered_targets(settings.replicas_path) if config.scrape_registered else None
    return MetricsScraper(config.scrape_targets, writer, interval_s=config.scrape_interval_s,
                          timeout_s=config.scrape_timeout_s, stats=stats, discover=discover)


def registered_targets(directory: Path) -> Callable[[], list[ScrapeTarget]]:
    """A lookup of the replicas registered in `directory` right now (launchers write one record per
    ready replica and remove it when they stop), as scrape targets named like the replicas."""
    from fleetlens.serving.registration import ReplicaDirectory

    replicas = ReplicaDirectory(directory)

    def discover() -> list[ScrapeTarget]:
        return [ScrapeTarget(replica=r.name, url=r.url, model=r.model) for r in replicas.records()]

    return discover

