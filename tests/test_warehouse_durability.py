"""Durability of the embedded warehouse server under `kill -9` and graceful SIGTERM.

What the server promises (fleetlens/warehouse/server/runner.py): an INSERT answered 200 has its
parts written by the engine before the answer, so it survives a `kill -9`; on SIGTERM uvicorn
stops accepting connections and lets in-flight requests finish before the engine is closed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
from clickhouse_connect.driver.exceptions import OperationalError

pytestmark = pytest.mark.timeout(240)

BATCH_ROWS = 1000
WRITERS = 2


@dataclass
class WriterLog:
    """What one insert thread saw: acknowledged batches and the error that stopped it."""

    acked: list[int] = field(default_factory=list)
    error: BaseException | None = None
    failed_batch: int | None = None
    failed_started_at: float | None = None


def _batch(batch: int) -> list[list[object]]:
    return [[batch] * BATCH_ROWS, list(range(BATCH_ROWS)), [f"b{batch}-r{i}" for i in range(BATCH_ROWS)]]


def test_acknowledged_inserts_survive_kill9(start_warehouse) -> None:
    wh = start_warehouse()
    wh.client().command(
        "CREATE TABLE default.acks (batch UInt32, i UInt32, v String) ENGINE = MergeTree ORDER BY (batch, i)"
    )

    stop = threading.Event()
    next_batch = iter(range(1, 10**9))
    batch_lock = threading.Lock()
    logs = [WriterLog() for _ in range(WRITERS)]

    def writer(log: WriterLog) -> None:
        client = wh.client(connect_timeout=5, send_receive_timeout=30)
        while not stop.is_set():
            with batch_lock:
                batch = next(next_batch)
            started = time.monotonic()
            try:
                client.insert("default.acks", _batch(batch), column_names=["batch", "i", "v"],
                              column_oriented=True)
            except BaseException as error:  # noqa: BLE001 - recorded and asserted on below
                log.error, log.failed_batch, log.failed_started_at = error, batch, started
                return
            log.acked.append(batch)

    threads = [threading.Thread(target=writer, args=(log,), daemon=True) for log in logs]
    for thread in threads:
        thread.start()

    # Kill once inserts are clearly flowing: at least 2 s in and at least 20 batches acknowledged.
    began = time.monotonic()
    while time.monotonic() - began < 60:
        if time.monotonic() - began >= 2.0 and sum(len(log.acked) for log in logs) >= 20:
            break
        if not any(thread.is_alive() for thread in threads):
            break
        time.sleep(0.05)
    assert all(thread.is_alive() for thread in threads), f"a writer stopped before the kill: {logs}"
    killed_at = time.monotonic()
    wh.kill9()
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "an insert did not return within 60 s of the kill"

    acked = sorted(batch for log in logs for batch in log.acked)
    failures = [log for log in logs if log.error is not None]
    in_flight = [log for log in failures if log.failed_started_at is not None and log.failed_started_at < killed_at]
    print(f"\nkill -9 after {killed_at - began:.2f} s: {len(acked)} batches acknowledged, "
          f"{len(failures)} inserts failed ({len(in_flight)} of them in flight at the kill): "
          + "; ".join(f"batch {log.failed_batch}: {type(log.error).__name__}" for log in failures))
    assert len(acked) > 10
    assert failures, "no insert failed: the kill did not interrupt the insert stream"
    for log in failures:
        assert isinstance(log.error, OperationalError), f"batch {log.failed_batch}: unexpected {log.error!r}"
    assert in_flight, "no insert was in flight when the server was killed"

    restarted = start_warehouse(path=wh.path, port=wh.port)
    client = restarted.client()
    rows = client.query(
        "SELECT batch, count(), uniqExact(i), min(i), max(i), countIf(v != concat('b', toString(batch), '-r', toString(i))) "
        "FROM default.acks GROUP BY batch ORDER BY batch"
    ).result_rows
    present = {row[0]: row for row in rows}
    missing = [batch for batch in acked if batch not in present]
    assert not missing, f"{len(missing)} acknowledged batches lost after kill -9: {missing[:20]}"
    partial = {batch: row for batch, row in present.items()
               if row[1:] != (BATCH_ROWS, BATCH_ROWS, 0, BATCH_ROWS - 1, 0)}
    assert not partial, f"batches partially present or corrupted after kill -9: {partial}"
    unacked_present = sorted(set(present) - set(acked))
    assert set(unacked_present) <= {log.failed_batch for log in failures}, unacked_present
    print(f"after restart: {len(present)} complete batches ({len(unacked_present)} committed but not acknowledged)")


ROWS = 2_000_000
CHUNK_ROWS = 100_000


def _tsv_chunks(start: int, stop: int):
    for first in range(start, stop, CHUNK_ROWS):
        last = min(first + CHUNK_ROWS, stop)
        yield "".join(f"{i}\trow{i}\n" for i in range(first, last)).encode()


def _shutting_down(url: str) -> bool:
    """True once the server no longer accepts new connections (uvicorn closed its listener)."""
    try:
        httpx.get(f"{url}/ping", timeout=1)
    except httpx.TransportError:
        return True
    return False


def _sigterm_during_insert(start_warehouse) -> tuple[object, int | None, int]:
    """Start a 2M-row streamed insert, SIGTERM the server halfway through its body, finish the body.

    The body generator pauses after the first half until the server is verifiably shutting down
    (it refuses new connections), so the insert is in flight across the SIGTERM every time.
    Returns (insert result or exception, server exit code, rows found after a restart).
    """
    wh = start_warehouse()
    wh.client().command("CREATE TABLE default.big (i UInt64, s String) ENGINE = MergeTree ORDER BY i")

    half_sent = threading.Event()
    release = threading.Event()

    def body():
        yield from _tsv_chunks(0, ROWS // 2)
        half_sent.set()
        assert release.wait(timeout=60), "the test never released the insert body"
        yield from _tsv_chunks(ROWS // 2, ROWS)

    outcome: dict[str, object] = {}

    def insert() -> None:
        client = wh.client(connect_timeout=5, send_receive_timeout=120)
        try:
            outcome["result"] = client.raw_insert("default.big", ["i", "s"], body(), fmt="TabSeparated")
        except BaseException as error:  # noqa: BLE001 - asserted on by the caller
            outcome["result"] = error

    inserter = threading.Thread(target=insert, daemon=True)
    inserter.start()
    assert half_sent.wait(timeout=60), "the insert never got its first half out"
    time.sleep(0.3)  # let the server take in what was sent

    exit_code: dict[str, int | None] = {}
    stopper = threading.Thread(target=lambda: exit_code.setdefault("rc", wh.stop(timeout_s=90)), daemon=True)
    stopper.start()
    deadline = time.monotonic() + 30
    while not _shutting_down(wh.url):
        assert time.monotonic() < deadline, "the server kept accepting connections 30 s after SIGTERM"
        time.sleep(0.05)
    assert wh.process.poll() is None, "the server exited with an insert still in flight"
    release.set()

    inserter.join(timeout=120)
    stopper.join(timeout=120)
    assert not inserter.is_alive() and not stopper.is_alive(), "the insert or the shutdown hung"

    restarted = start_warehouse(path=wh.path, port=wh.port)
    count = int(restarted.client().command("SELECT count() FROM default.big"))
    return outcome["result"], exit_code["rc"], count


def test_sigterm_lets_in_flight_insert_finish(start_warehouse) -> None:
    result, rc, count = _sigterm_during_insert(start_warehouse)
    answer = result if isinstance(result, BaseException) else f"{result.written_rows} rows written"
    print(f"\nSIGTERM during a {ROWS}-row insert: insert -> {answer}, exit code {rc}, rows after restart {count}")
    assert not isinstance(result, BaseException), f"the in-flight insert failed: {result!r}"
    assert result.written_rows == ROWS
    assert count == ROWS


def test_sigterm_exit_code_is_zero(start_warehouse) -> None:
    """A graceful stop is a success: the server must exit 0, not die of the signal it handled."""
    result, rc, count = _sigterm_during_insert(start_warehouse)
    assert not isinstance(result, BaseException) and count == ROWS
    assert rc == 0, f"server exit code after a graceful SIGTERM stop: {rc} (negative = killed by signal {-(rc or 0)})"
