"""The ClickHouse writer: spool → batches → columnar inserts, with retries, in worker processes.

Turning spans into rows is pure-Python work (about 20 µs a span), so it runs in worker processes
next to the receivers' event loop instead of competing with it for the GIL. The dispatcher thread
reads batches from the spool in order, hands each to a worker (which parses, maps and inserts with
its own clickhouse-connect client), and moves the spool's checkpoint only past batches that are
in ClickHouse, in order, so a crash replays exactly what might be missing.

Failures:
- the warehouse is unreachable or busy (network errors, 5xx, "too many parts", a missing table
  before `fleetlens migrate`): the batch is retried with exponential backoff, forever; the spool
  keeps taking data meanwhile;
- the warehouse refuses the data itself (a type or parse error) more than `INVALID_ATTEMPTS`
  times: the batch is retried one request at a time, and requests that still fail go to the
  spool's dead-letter folder (kept, counted, logged) so one bad request cannot stop the pipeline.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from fleetlens.config import WarehouseURL

from .mapping import TraceColumns
from .spool import Batch, Cursor, Spool, read_records

log = logging.getLogger(__name__)

INVALID_ATTEMPTS = 3
# ClickHouse error codes that mean "try again later", not "this data is wrong".
TRANSIENT_CODES = frozenset({
    3,    # UNEXPECTED_END_OF_FILE (connection cut mid-request)
    60,   # UNKNOWN_TABLE (not migrated yet)
    81,   # UNKNOWN_DATABASE
    159,  # TIMEOUT_EXCEEDED
    164,  # READONLY
    173,  # CANNOT_ALLOCATE_MEMORY
    202,  # TOO_MANY_SIMULTANEOUS_QUERIES
    203,  # NO_FREE_CONNECTION
    209,  # SOCKET_TIMEOUT
    210,  # NETWORK_ERROR
    241,  # MEMORY_LIMIT_EXCEEDED
    242,  # TABLE_IS_READ_ONLY
    252,  # TOO_MANY_PARTS
    236,  # ABORTED
    319,  # UNKNOWN_STATUS_OF_INSERT
    373,  # SESSION_IS_LOCKED
    394,  # QUERY_WAS_CANCELLED
    425,  # SYSTEM_ERROR
    999,  # KEEPER_EXCEPTION
})
_CODE = re.compile(r"Code: (\d+)")


@dataclass
class WriteResult:
    """What a worker reports back (plain data: it crosses a process boundary)."""

    spans: int = 0
    error: str | None = None
    transient: bool = True
    failed_records: list[tuple[bytes, str]] = field(default_factory=list)  # (request, reason): dead letters


# ----------------------------------------------------------------- worker side
_client: Any = None
_url: WarehouseURL | None = None


def _init_worker(url: WarehouseURL, parent_pid: int) -> None:
    global _url
    _url = url
    # Ctrl-C / SIGTERM to the process group is for the collector, which drains and then stops the
    # pool; a worker dying first would only turn its in-flight batch into a retry.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # clickhouse-connect logs every failed request at ERROR; the dispatcher reports them once, classified.
    logging.getLogger("clickhouse_connect").setLevel(logging.CRITICAL)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()


def _get_client() -> Any:
    """Connect lazily: a worker must start even while the warehouse is down."""
    global _client
    if _client is None:
        from fleetlens.warehouse.client import connect

        assert _url is not None
        _client = connect(_url, connect_timeout=5, send_receive_timeout=120)
    return _client


def _exit_with_parent(parent_pid: int) -> None:
    """A `kill -9` of the collector leaves no orphaned writers behind."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def _classify(error: BaseException) -> tuple[str, bool]:
    from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

    global _client
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, OperationalError) or not isinstance(error, DatabaseError):
        _client = None  # reconnect next time
        return text[:2000], True
    match = _CODE.search(str(error))
    code = int(match.group(1)) if match else None
    # A DatabaseError without a code is an HTTP-level failure (proxy 5xx, auth): retry it.
    return text[:2000], code is None or code in TRANSIENT_CODES


def _insert(records: list[bytes]) -> int:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    from .mapping import COLUMNS, map_request

    columns = TraceColumns()
    for payload in records:
        map_request(ExportTraceServiceRequest.FromString(payload), into=columns)
    if len(columns):
        # A batch may span many days (a backfill, replay after an outage): one part per day is fine.
        _get_client().raw_insert("otel_traces", list(COLUMNS), json_columns(columns), fmt="JSONColumns",
                                 settings={"max_partitions_per_insert_block": 0})
    return len(columns)


def json_columns(columns: TraceColumns) -> bytes:
    """The batch as ClickHouse's `JSONColumns` format: still one array per column, but encoded by
    orjson in C (~1.5 µs a span) instead of clickhouse-connect's Python Native encoder (~14 µs a
    span, half of it building LowCardinality dictionaries); ClickHouse parses it in C++.
    Timestamps go as decimal seconds strings zero-padded to ten digits: a JSON integer would be read
    as whole seconds, and a short string like "0.5" as a date."""
    data = dict(columns.columns)
    data["Timestamp"] = [_decimal_seconds(ns) for ns in data["Timestamp"]]
    data["Events.Timestamp"] = [[_decimal_seconds(ns) for ns in row] if row else row
                                for row in data["Events.Timestamp"]]
    return orjson.dumps(data)


def _decimal_seconds(ns: int) -> str:
    return f"{ns // 1_000_000_000:010d}.{ns % 1_000_000_000:09d}"


def write_batch(spool_path: Path, ranges: list[tuple[int, int, int]], isolate: bool = False) -> WriteResult:
    """Read one batch from the spool, map and insert it. With `isolate`, one request at a time,
    reporting the ones the warehouse refused (with their bytes, for the dead-letter folder)."""
    try:
        payloads = read_records(spool_path, ranges)
    except OSError as error:
        return WriteResult(error=f"cannot read the spool: {error}", transient=True)
    result = WriteResult()
    records: list[bytes] = []
    for payload in payloads:
        if payload is None:  # failed its CRC after it was acknowledged: keep it aside, never guess
            result.failed_records.append((b"", "spool record failed its CRC check"))
        else:
            records.append(payload)
    if not isolate:
        try:
            result.spans = _insert(records)
            return result
        except Exception as error:  # noqa: BLE001 - every failure is reported, classified
            text, transient = _classify(error)
            return WriteResult(error=text, transient=transient)
    for payload in records:
        try:
            result.spans += _insert([payload])
        except Exception as error:  # noqa: BLE001
            text, transient = _classify(error)
            if transient:
                return WriteResult(error=text, transient=True)
            result.failed_records.append((payload, text))
    return result


# ------------------------------------------------------------- dispatcher side
@dataclass
class WriterStats:
    batches_written: int = 0
    spans_written: int = 0
    write_errors: int = 0
    dead_lettered_records: int = 0
    last_error: str | None = None
    last_batch_seconds: float = 0.0
    batch_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=1024))


@dataclass
class _InFlight:
    batch: Batch
    future: Future[WriteResult]
    attempts: int = 1
    invalid_attempts: int = 0
    isolate: bool = False
    retry_at: float = 0.0
    started: float = field(default_factory=time.monotonic)
    result: WriteResult | None = None


class Writer:
    """Drains the spool into ClickHouse with `workers` processes; start() / stop()."""

    def __init__(
        self,
        spool: Spool,
        warehouse_url: WarehouseURL,
        *,
        workers: int = 2,
        batch_max_spans: int = 20_000,
        batch_timeout_s: float = 0.5,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
    ) -> None:
        self.spool = spool
        self.warehouse_url = warehouse_url
        self.workers = workers
        self.batch_max_spans = batch_max_spans
        self.batch_timeout_s = batch_timeout_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.stats = WriterStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="writer-dispatch", daemon=True)
        self._pool: ProcessPoolExecutor | None = None

    @property
    def healthy(self) -> bool:
        return self.stats.last_error is None

    def start(self) -> None:
        self._pool = self._new_pool()
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(self.warehouse_url, os.getpid()),
        )

    def _submit(self, batch: Batch, isolate: bool) -> Future[WriteResult]:
        assert self._pool is not None
        try:
            return self._pool.submit(write_batch, self.spool.path, batch.ranges, isolate)
        except (BrokenProcessPool, RuntimeError):
            log.error("writer process pool broke; starting a new one")
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            return self._pool.submit(write_batch, self.spool.path, batch.ranges, isolate)

    def _run(self) -> None:
        inflight: deque[_InFlight] = deque()
        cursor = self.spool.checkpoint
        max_inflight = self.workers * 2
        while not self._stop.is_set():
            try:
                cursor = self._step(inflight, cursor, max_inflight)
            except Exception:  # noqa: BLE001 - the dispatcher must outlive any one bad moment
                log.exception("writer dispatcher error; retrying in 1 s")
                time.sleep(1.0)

    def _step(self, inflight: deque[_InFlight], cursor: Cursor, max_inflight: int) -> Cursor:
        """One turn: read and hand out a batch if there is room, else settle what finished."""
        retrying = any(item.result and item.result.error for item in inflight)
        if len(inflight) < max_inflight and not retrying:
            batch = self.spool.read_batch(
                cursor,
                max_spans=self.batch_max_spans,
                max_wait_s=self.batch_timeout_s,
                first_wait_s=0.02 if inflight else 0.2,
                payloads=False,  # the worker reads them from disk: batches never sit in this process
            )
            if batch is not None:
                inflight.append(_InFlight(batch, self._submit(batch, False)))
                return batch.end
        elif inflight:
            time.sleep(0.005)
        self._settle(inflight)
        return cursor

    def _settle(self, inflight: deque[_InFlight]) -> None:
        now = time.monotonic()
        for item in inflight:
            if item.result is None and item.future.done():
                item.result = self._outcome(item)
                if item.result.error:
                    self._schedule_retry(item, now)
            elif item.result is not None and item.result.error and now >= item.retry_at:
                item.result = None
                item.attempts += 1
                item.future = self._submit(item.batch, item.isolate)
        committed = None
        while inflight and inflight[0].result is not None and not inflight[0].result.error:
            done = inflight.popleft()
            committed = done.batch.end
        if committed is not None:
            self.spool.commit(committed)

    def _outcome(self, item: _InFlight) -> WriteResult:
        try:
            result = item.future.result()
        except BrokenProcessPool as error:
            return WriteResult(error=f"writer process died: {error}", transient=True)
        except Exception as error:  # noqa: BLE001 - pickling problems and the like: retry
            return WriteResult(error=f"{type(error).__name__}: {error}", transient=True)
        if result.error is None:
            for payload, reason in result.failed_records:
                path = self.spool.dead_letter(payload, reason)
                self.stats.dead_lettered_records += 1
                log.error("warehouse refused a request as invalid; kept in %s: %s", path, reason[:300])
            elapsed = time.monotonic() - item.started
            self.stats.batches_written += 1
            self.stats.spans_written += result.spans
            self.stats.last_batch_seconds = elapsed
            self.stats.batch_seconds.append(elapsed)
            if self.stats.last_error is not None:
                log.info("warehouse writes succeed again")
            self.stats.last_error = None
        return result

    def _schedule_retry(self, item: _InFlight, now: float) -> None:
        result = item.result
        assert result is not None and result.error is not None
        self.stats.write_errors += 1
        if self.stats.last_error is None or item.attempts in (1, 5) or item.attempts % 20 == 0:
            log.warning("warehouse write failed (attempt %d, %d spans, will retry): %s",
                        item.attempts, item.batch.spans, result.error[:300])
        self.stats.last_error = result.error
        if not result.transient:
            item.invalid_attempts += 1
            if item.invalid_attempts >= INVALID_ATTEMPTS and not item.isolate:
                item.isolate = True
                item.retry_at = now
                return
        backoff = min(self.retry_max_s, self.retry_initial_s * 2 ** min(item.attempts - 1, 16))
        item.retry_at = now + backoff
