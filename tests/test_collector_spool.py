"""The write-ahead spool on its own: order, durability across reopen, torn tails, bounds, drops."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetlens.collector.spool import HEADER, Cursor, Spool, SpoolFull


def _spool(path: Path, **kwargs: object) -> Spool:
    options = {"max_bytes": 10**9, "queue_max_bytes": 10**8, "segment_bytes": 4096}
    options.update(kwargs)
    return Spool(path, **options)  # type: ignore[arg-type]


def _drain(spool: Spool, max_spans: int = 50) -> list[bytes]:
    out: list[bytes] = []
    cursor = spool.checkpoint
    while batch := spool.read_batch(cursor, max_spans=max_spans, max_wait_s=0.01, first_wait_s=0.01):
        out.extend(batch.records)
        cursor = batch.end
        spool.commit(cursor)
    return out


def test_records_come_back_in_order_across_segments_and_finished_segments_go(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    payloads = [f"request-{i}".encode() * 40 for i in range(200)]
    for payload in payloads:
        spool.append_sync(payload, spans=3)
    segments = list((tmp_path / "segments").iterdir())
    assert len(segments) > 5  # rolled at 4 KiB
    assert _drain(spool) == payloads
    assert spool.size_bytes == 0
    assert len(list((tmp_path / "segments").iterdir())) == 1  # only the one being written remains
    assert spool.stats.appended_spans == 600
    spool.close()


def test_reopen_replays_from_the_checkpoint(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    for i in range(10):
        spool.append_sync(b"r%d" % i, spans=1)
    batch = spool.read_batch(spool.checkpoint, max_spans=4, max_wait_s=0.01, first_wait_s=0.01)
    assert batch is not None and batch.records == [b"r0", b"r1", b"r2", b"r3"]
    spool.commit(batch.end)
    spool.close()  # as if the process died here: r4..r9 were acknowledged but never written

    reopened = _spool(tmp_path)
    assert reopened.stats.recovered_spans == 6
    assert _drain(reopened) == [b"r%d" % i for i in range(4, 10)]
    reopened.close()


def test_torn_tail_is_cut_and_later_records_are_kept(tmp_path: Path) -> None:
    spool = _spool(tmp_path, segment_bytes=10**6)
    spool.append_sync(b"whole", spans=1)
    spool.close()
    (segment,) = (tmp_path / "segments").iterdir()
    with open(segment, "ab") as fh:  # a crash between write() and fsync(): half a header
        fh.write(HEADER.pack(0xF17E, 1, 0, 100, 1, 0)[:9])
    reopened = _spool(tmp_path, segment_bytes=10**6)
    assert reopened.stats.torn_bytes == 9
    reopened.append_sync(b"after", spans=1)
    assert _drain(reopened) == [b"whole", b"after"]
    reopened.close()


def test_corrupt_record_is_counted_not_fatal(tmp_path: Path) -> None:
    spool = _spool(tmp_path, segment_bytes=64)
    spool.append_sync(b"a" * 60, spans=1)  # segment 1
    spool.append_sync(b"b" * 60, spans=1)  # rolls: segment 2
    spool.append_sync(b"c" * 60, spans=1)  # segment 3
    first = sorted((tmp_path / "segments").iterdir())[0]
    data = bytearray(first.read_bytes())
    data[HEADER.size + 5] ^= 0xFF  # flip a payload byte: CRC mismatch
    first.write_bytes(bytes(data))
    assert _drain(spool) == [b"b" * 60, b"c" * 60]
    assert spool.stats.corrupt_records == 1
    spool.close()


def test_reject_policy_refuses_past_the_bound(tmp_path: Path) -> None:
    spool = _spool(tmp_path, max_bytes=1000)
    spool.append_sync(b"x" * 600, spans=1)
    with pytest.raises(SpoolFull):
        spool.append_sync(b"y" * 600, spans=1)
    assert _drain(spool) == [b"x" * 600]  # once written, there is room again
    spool.append_sync(b"y" * 600, spans=1)
    spool.close()


def test_drop_oldest_drops_whole_unread_segments_and_counts_them(tmp_path: Path) -> None:
    spool = _spool(tmp_path, max_bytes=2000, segment_bytes=500, full_policy="drop_oldest")
    for i in range(20):
        spool.append_sync(bytes([65 + i]) * 300, spans=7)
    assert spool.stats.dropped_spans > 0 and spool.stats.dropped_spans % 7 == 0
    assert spool.size_bytes <= 2000 + 500 + HEADER.size + 300
    survivors = _drain(spool)
    # the newest data survives, the first record (in the segment being read first) too, and
    # everything that is neither was counted as dropped
    assert survivors[-1] == bytes([65 + 19]) * 300
    assert len(survivors) * 7 + spool.stats.dropped_spans == 20 * 7
    spool.close()


def test_checkpoint_never_moves_backwards(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    spool.append_sync(b"a", spans=1)
    spool.append_sync(b"b", spans=1)
    end = spool.durable_end
    spool.commit(end)
    spool.commit(Cursor(end.segment, 0))
    assert spool.checkpoint == end
    spool.close()
    assert _spool(tmp_path).checkpoint == end  # on disk too
