"""The write-ahead spool: every accepted OTLP request is on disk (fsynced) before it is acknowledged.

Why a write-ahead log rather than "write to ClickHouse, spool on failure": the sender's
acknowledgement then never waits for the warehouse, a slow or absent warehouse only makes the
spool longer, and a `kill -9` at any moment loses nothing that was acknowledged. The writer
consumes the spool in order and moves a checkpoint forward once rows are in ClickHouse; what lies
after the checkpoint is replayed on restart (at-least-once: a batch written just before a crash
may be written again, and downstream models drop duplicate `(TraceId, SpanId)` rows).

Layout of the spool directory::

    segments/0000000000000001.wal   records, appended; rolled at `segment_bytes`
    checkpoint.json                 {"segment": n, "offset": bytes} of the first unwritten record
    deadletter/                     records ClickHouse refused as invalid (kept, counted, never replayed)

A record is a 16-byte header (magic, flags, payload length, span count, CRC32 of the payload) and
the payload: the serialized `ExportTraceServiceRequest`. A torn record at the end of the last
segment (a crash between write and fsync; it was never acknowledged) is cut off on open.

Appends are group-committed: one thread writes everything that is waiting and calls `fdatasync`
once, so many concurrent requests share one disk flush.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

HEADER = struct.Struct("<HBBIII")  # magic, version, flags, length, spans, crc32
MAGIC = 0xF17E
VERSION = 1
SEGMENT_SUFFIX = ".wal"


class SpoolError(Exception):
    """Base for reasons the spool refuses a record; all of them are retryable for the sender."""

    retry_after_s: float = 1.0


class SpoolOverloaded(SpoolError):
    """More bytes wait for the disk than the queue bound allows (the sender should slow down)."""


class SpoolFull(SpoolError):
    """The spool holds `max_bytes` already and the policy is to refuse rather than drop."""

    retry_after_s = 5.0


class SpoolClosed(SpoolError):
    """The collector is shutting down."""


@dataclass(frozen=True, order=True)
class Cursor:
    """A position in the spool: segment number and byte offset inside it."""

    segment: int
    offset: int


@dataclass
class Batch:
    """Consecutive records of the spool; `end` is where the next batch starts. `ranges` locate
    them on disk as (segment, start offset, end offset); `records` holds the payloads when they
    were asked for (the writer's workers read them from `ranges` themselves, so the collector
    process never holds a batch in memory)."""

    start: Cursor
    end: Cursor
    records: list[bytes]
    spans: int
    ranges: list[tuple[int, int, int]] = field(default_factory=list)


@dataclass
class SpoolStats:
    appended_records: int = 0
    appended_spans: int = 0
    recovered_spans: int = 0  # unwritten at start: replayed from a previous run
    dropped_spans: int = 0  # drop_oldest policy, counted and logged
    corrupt_records: int = 0
    torn_bytes: int = 0
    fsyncs: int = 0


class Spool:
    """A bounded, ordered, crash-safe queue of OTLP requests on disk."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        queue_max_bytes: int,
        segment_bytes: int = 64 * 1024**2,
        full_policy: str = "reject",
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.queue_max_bytes = queue_max_bytes
        self.segment_bytes = segment_bytes
        self.full_policy = full_policy
        self.stats = SpoolStats()
        self._segments_dir = self.path / "segments"
        self._segments_dir.mkdir(parents=True, exist_ok=True)
        (self.path / "deadletter").mkdir(exist_ok=True)
        self._lock = threading.Lock()
        self._data_ready = threading.Condition(self._lock)
        self._pending: deque[tuple[bytes, int, Callable[[BaseException | None], None]]] = deque()
        self._pending_bytes = 0
        self._closed = False
        self._checkpoint = self._load_checkpoint()
        self._read_segment = self._checkpoint.segment  # furthest segment the writer has read from
        self._sizes = self._recover()  # segment -> durable size in bytes
        self._write_segment = max(self._sizes) if self._sizes else self._checkpoint.segment
        if not self._sizes:
            self._open_new_segment(self._write_segment)
        self._file = open(self._segment_path(self._write_segment), "ab")  # noqa: SIM115 - lives with the spool
        self.stats.recovered_spans = self._count_unwritten_spans()
        if self.stats.recovered_spans:
            log.info("spool: %d spans from a previous run are not in the warehouse yet; replaying them",
                     self.stats.recovered_spans)
        self._thread = threading.Thread(target=self._flush_loop, name="spool-flush", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ state
    @property
    def checkpoint(self) -> Cursor:
        return self._checkpoint

    @property
    def durable_end(self) -> Cursor:
        with self._lock:
            return Cursor(self._write_segment, self._sizes[self._write_segment])

    @property
    def size_bytes(self) -> int:
        """Bytes on disk from the checkpoint on (what the bound applies to)."""
        with self._lock:
            return self._unwritten_bytes()

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def _unwritten_bytes(self) -> int:
        total = 0
        for segment, size in self._sizes.items():
            if segment == self._checkpoint.segment:
                total += size - self._checkpoint.offset
            elif segment > self._checkpoint.segment:
                total += size
        return total

    def _segment_path(self, segment: int) -> Path:
        return self._segments_dir / f"{segment:016d}{SEGMENT_SUFFIX}"

    # --------------------------------------------------------------- recovery
    def _load_checkpoint(self) -> Cursor:
        try:
            data = json.loads((self.path / "checkpoint.json").read_text())
            return Cursor(int(data["segment"]), int(data["offset"]))
        except FileNotFoundError:
            segments = self._list_segments()
            return Cursor(segments[0] if segments else 1, 0)
        except (ValueError, KeyError, TypeError) as error:
            # A checkpoint we cannot read: replay everything there is (duplicates, not loss).
            log.error("spool checkpoint unreadable (%s); replaying every segment", error)
            segments = self._list_segments()
            return Cursor(segments[0] if segments else 1, 0)

    def _list_segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self._segments_dir.glob(f"*{SEGMENT_SUFFIX}") if p.stem.isdigit())

    def _recover(self) -> dict[int, int]:
        sizes: dict[int, int] = {}
        segments = self._list_segments()
        for segment in segments:
            if segment < self._checkpoint.segment:
                self._segment_path(segment).unlink(missing_ok=True)
                continue
            sizes[segment] = self._segment_path(segment).stat().st_size
        if sizes:
            last = max(sizes)
            valid = self._valid_prefix(last)
            if valid < sizes[last]:
                self.stats.torn_bytes += sizes[last] - valid
                log.warning("spool: cut %d torn bytes (never acknowledged) off segment %d", sizes[last] - valid, last)
                with open(self._segment_path(last), "r+b") as fh:
                    fh.truncate(valid)
                    os.fsync(fh.fileno())
                sizes[last] = valid
        if self._checkpoint.segment not in sizes and sizes:
            self._checkpoint = Cursor(min(sizes), 0)
        return sizes

    def _valid_prefix(self, segment: int) -> int:
        """Length of the run of intact records at the start of a segment."""
        offset = 0
        with open(self._segment_path(segment), "rb") as fh:
            while True:
                header = fh.read(HEADER.size)
                if len(header) < HEADER.size:
                    return offset
                magic, version, _flags, length, _spans, crc = HEADER.unpack(header)
                if magic != MAGIC or version != VERSION:
                    return offset
                payload = fh.read(length)
                if len(payload) < length or zlib.crc32(payload) != crc:
                    return offset
                offset += HEADER.size + length

    def _open_new_segment(self, segment: int) -> None:
        self._segment_path(segment).touch()
        self._sizes[segment] = 0
        fd = os.open(self._segments_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---------------------------------------------------------------- appends
    def admit(self, nbytes: int) -> None:
        """Raise the retryable reason why `nbytes` more cannot be taken now, if there is one."""
        if self._closed:
            raise SpoolClosed("collector is shutting down")
        if self._pending_bytes + nbytes > self.queue_max_bytes and self._pending_bytes > 0:
            raise SpoolOverloaded(f"{self._pending_bytes} bytes are already waiting for the disk")
        if self.full_policy == "reject":
            with self._lock:
                used = self._unwritten_bytes() + self._pending_bytes
            if used + nbytes + HEADER.size > self.max_bytes:
                raise SpoolFull(f"spool holds {used} bytes of its {self.max_bytes}-byte bound")

    def submit(self, payload: bytes, spans: int, done: Callable[[BaseException | None], None]) -> None:
        """Queue one record; `done(None)` is called from the flush thread once it is fsynced."""
        self.admit(len(payload))
        with self._lock:
            self._pending.append((payload, spans, done))
            self._pending_bytes += len(payload)
            self._data_ready.notify_all()

    async def append(self, payload: bytes, spans: int) -> None:
        """Append one record and return once it is durable (the moment the sender may be told OK)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def done(error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, future, error)

        self.submit(payload, spans, done)
        await future

    def append_sync(self, payload: bytes, spans: int, timeout: float | None = None) -> None:
        """Blocking `append`, for callers outside an event loop."""
        finished = threading.Event()
        outcome: list[BaseException | None] = []

        def done(error: BaseException | None) -> None:
            outcome.append(error)
            finished.set()

        self.submit(payload, spans, done)
        if not finished.wait(timeout):
            raise TimeoutError("spool append not durable in time")
        if outcome[0] is not None:
            raise outcome[0]

    def _flush_loop(self) -> None:
        while True:
            with self._lock:
                while not self._pending and not self._closed:
                    self._data_ready.wait()
                if not self._pending and self._closed:
                    return
                items = list(self._pending)
                self._pending.clear()
            try:
                self._write_records(items)
                error: BaseException | None = None
            except OSError as exc:  # disk full, I/O error: the senders get a retryable answer
                log.error("spool write failed: %s", exc)
                error = SpoolOverloaded(f"spool write failed: {exc}")
            with self._lock:
                self._pending_bytes -= sum(len(p) for p, _, _ in items)
                self._data_ready.notify_all()
            for _payload, _spans, done in items:
                done(error)

    def _write_records(self, items: list[tuple[bytes, int, Callable[[BaseException | None], None]]]) -> None:
        chunks: list[bytes] = []
        size = self._sizes[self._write_segment]
        for payload, spans, _done in items:
            if size >= self.segment_bytes:
                self._flush_chunks(chunks)
                chunks = []
                self._roll()
                size = 0
            chunks.append(HEADER.pack(MAGIC, VERSION, 0, len(payload), spans, zlib.crc32(payload)))
            chunks.append(payload)
            size += HEADER.size + len(payload)
            self.stats.appended_records += 1
            self.stats.appended_spans += spans
        self._flush_chunks(chunks)
        if self.full_policy == "drop_oldest":
            self._drop_oldest_over_bound()

    def _flush_chunks(self, chunks: list[bytes]) -> None:
        if not chunks:
            return
        written = os.writev(self._file.fileno(), chunks)
        expected = sum(len(c) for c in chunks)
        if written != expected:  # writev may be short on huge vectors: finish with plain writes
            data = b"".join(chunks)[written:]
            while data:
                data = data[os.write(self._file.fileno(), data):]
        os.fdatasync(self._file.fileno())
        self.stats.fsyncs += 1
        with self._lock:
            self._sizes[self._write_segment] += expected
            self._data_ready.notify_all()

    def _roll(self) -> None:
        os.fsync(self._file.fileno())
        self._file.close()
        with self._lock:
            self._write_segment += 1
            self._open_new_segment(self._write_segment)
        self._file = open(self._segment_path(self._write_segment), "ab")  # noqa: SIM115

    def _drop_oldest_over_bound(self) -> None:
        """drop_oldest: delete whole unwritten segments, oldest first, until under the bound."""
        while True:
            with self._lock:
                if self._unwritten_bytes() <= self.max_bytes:
                    return
                # Never the segment being written, nor any the writer has read (in flight or written).
                oldest_unread = max(self._checkpoint.segment, self._read_segment)
                candidates = [s for s in sorted(self._sizes) if oldest_unread < s < self._write_segment]
                if not candidates:
                    return
                victim = candidates[0]
                del self._sizes[victim]  # in the same locked step: no reader can start on it now
            spans = self._count_spans(victim)
            self._segment_path(victim).unlink(missing_ok=True)
            self.stats.dropped_spans += spans
            log.error("spool over its %d-byte bound: dropped segment %d (%d spans)", self.max_bytes, victim, spans)

    def _count_unwritten_spans(self) -> int:
        return sum(
            self._count_spans(segment, self._checkpoint.offset if segment == self._checkpoint.segment else 0)
            for segment in self._sizes
            if segment >= self._checkpoint.segment
        )

    def _count_spans(self, segment: int, offset: int = 0) -> int:
        spans = 0
        with open(self._segment_path(segment), "rb") as fh:
            fh.seek(offset)
            while header := fh.read(HEADER.size):
                if len(header) < HEADER.size:
                    break
                _m, _v, _f, length, count, _crc = HEADER.unpack(header)
                spans += count
                fh.seek(length, os.SEEK_CUR)
        return spans

    # ------------------------------------------------------------------ reads
    def read_batch(self, cursor: Cursor, *, max_spans: int, max_wait_s: float, first_wait_s: float,
                   payloads: bool = True) -> Batch | None:
        """Records from `cursor` on: up to `max_spans`, waiting at most `max_wait_s` after the first
        record for more to arrive, and at most `first_wait_s` for the first. None if nothing came.
        With `payloads=False` only headers are read (the payloads stay on disk, see `read_records`)."""
        records: list[bytes] = []
        ranges: list[tuple[int, int, int]] = []
        count = 0
        spans = 0
        position = self._next_readable(cursor)
        start = position
        deadline_first = time.monotonic() + first_wait_s
        deadline: float | None = None
        reader: _SegmentReader | None = None
        try:
            while spans < max_spans:
                with self._lock:
                    limit = self._sizes.get(position.segment)
                    if limit is None:  # dropped under drop_oldest
                        position = self._first_after(position.segment)
                        continue
                    at_end = position.offset >= limit
                    if at_end and position.segment < self._write_segment:
                        position = self._first_after(position.segment)
                        continue
                    if at_end:
                        remaining = (deadline if deadline is not None else deadline_first) - time.monotonic()
                        if remaining <= 0 or self._closed:
                            break
                        self._data_ready.wait(min(remaining, 0.05))
                        continue
                    self._read_segment = max(self._read_segment, position.segment)
                if reader is None or reader.segment != position.segment:
                    if reader is not None:
                        reader.close()
                    reader = _SegmentReader(self._segment_path(position.segment), position.segment)
                record = reader.read_at(position.offset, limit, payload=payloads)
                if record is None:  # corrupt: count, skip the rest of this segment
                    self.stats.corrupt_records += 1
                    log.error("spool: corrupt record at segment %d offset %d; skipping the segment's rest",
                              position.segment, position.offset)
                    position = Cursor(position.segment, limit)
                    continue
                payload, length, record_spans = record
                if payloads:
                    records.append(payload)
                count += 1
                spans += record_spans
                end = position.offset + HEADER.size + length
                if ranges and ranges[-1][0] == position.segment and ranges[-1][2] == position.offset:
                    ranges[-1] = (position.segment, ranges[-1][1], end)
                else:
                    ranges.append((position.segment, position.offset, end))
                position = Cursor(position.segment, end)
                if deadline is None:
                    deadline = time.monotonic() + max_wait_s
                if time.monotonic() >= deadline:
                    break
        finally:
            if reader is not None:
                reader.close()
        if not count:
            return None
        return Batch(start=start, end=position, records=records, spans=spans, ranges=ranges)

    def _next_readable(self, cursor: Cursor) -> Cursor:
        with self._lock:
            return cursor if cursor.segment in self._sizes else self._first_after(cursor.segment)

    def _first_after(self, segment: int) -> Cursor:
        """Start of the first segment after `segment` that still exists (lock held)."""
        later = [s for s in self._sizes if s > segment]
        return Cursor(min(later), 0) if later else Cursor(self._write_segment, 0)

    def commit(self, cursor: Cursor) -> None:
        """Everything before `cursor` is in ClickHouse: move the checkpoint, delete finished segments."""
        with self._lock:
            cursor = max(self._checkpoint, cursor)
        tmp = self.path / "checkpoint.json.tmp"
        tmp.write_text(json.dumps({"segment": cursor.segment, "offset": cursor.offset}))
        os.replace(tmp, self.path / "checkpoint.json")
        with self._lock:
            self._checkpoint = cursor
            finished = [s for s in self._sizes if s < cursor.segment]
            for segment in finished:
                del self._sizes[segment]
            self._data_ready.notify_all()
        for segment in finished:
            self._segment_path(segment).unlink(missing_ok=True)

    def dead_letter(self, payload: bytes, reason: str) -> Path:
        """Keep a record ClickHouse refused as invalid, with the reason, out of the replay path."""
        stamp = f"{time.time_ns()}"
        target = self.path / "deadletter" / f"{stamp}.pb"
        target.write_bytes(payload)
        (self.path / "deadletter" / f"{stamp}.reason.txt").write_text(reason)
        return target

    def wait_drained(self, timeout_s: float) -> bool:
        """Block until everything durable is committed (or the timeout passes)."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._unwritten_bytes() > 0 or self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._data_ready.wait(min(remaining, 0.1))
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._data_ready.notify_all()
        self._thread.join()
        self._file.close()


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class _SegmentReader:
    def __init__(self, path: Path, segment: int) -> None:
        self.segment = segment
        self._fh = open(path, "rb")  # noqa: SIM115 - closed by the caller

    def read_at(self, offset: int, limit: int, payload: bool = True) -> tuple[bytes, int, int] | None:
        """(payload, payload length, span count) of the record at `offset`, None if it is not
        intact. Without `payload` only the header is checked and the payload is skipped."""
        if self._fh.tell() != offset:
            self._fh.seek(offset)
        header = self._fh.read(HEADER.size)
        if len(header) < HEADER.size:
            return None
        magic, version, _flags, length, spans, crc = HEADER.unpack(header)
        if magic != MAGIC or version != VERSION or offset + HEADER.size + length > limit:
            return None
        if not payload:
            self._fh.seek(length, os.SEEK_CUR)
            return b"", length, spans
        data = self._fh.read(length)
        if len(data) < length or zlib.crc32(data) != crc:
            return None
        return data, length, spans

    def close(self) -> None:
        self._fh.close()


def read_records(path: Path, ranges: list[tuple[int, int, int]]) -> list[bytes | None]:
    """The payloads in `ranges` of the spool at `path`, in order; None for a record that fails
    its CRC (the caller keeps it aside). Used by the writer's worker processes."""
    out: list[bytes | None] = []
    segments = Path(path) / "segments"
    for segment, start, end in ranges:
        reader = _SegmentReader(segments / f"{segment:016d}{SEGMENT_SUFFIX}", segment)
        try:
            offset = start
            while offset < end:
                header = reader.read_at(offset, end, payload=False)
                if header is None:
                    out.append(None)
                    break
                _, length, _ = header
                record = reader.read_at(offset, end)
                out.append(record[0] if record else None)
                offset += HEADER.size + length
        finally:
            reader.close()
    return out
