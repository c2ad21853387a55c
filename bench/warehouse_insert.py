"""Insert throughput: the embedded warehouse server vs chDB in-process.

    .venv/bin/python bench/warehouse_insert.py [--rows 1000000] [--repeat 3]

Starts `python -m fleetlens warehouse serve` on a free port and a temp dir, then inserts the same
otel_traces-like rows (Timestamp DateTime64(9), TraceId, SpanId, SpanName, ServiceName,
SpanAttributes Map(LowCardinality(String), String), Duration) as Native

  (a) through the server with clickhouse-connect `insert_df`, HTTP body uncompressed and lz4;
  (b) straight into chDB in this process: `chdb.connect(path).send_insert(..., "Native")` fed the
      exact Native bytes clickhouse-connect sends (the body minus its `INSERT ... FORMAT Native`
      line), in 1 MiB pieces as the server feeds them.

One untimed warm-up round, then `--repeat` timed rounds; the table is truncated after every insert. Reported: median seconds over the repeats,
rows/s, the server overhead (in-process rows/s / server rows/s), and clickhouse-connect's own
encoding time (DataFrame -> Native bytes, measured alone), as a share of the server time. The
client encodes while it sends, so that share is the client's work, not necessarily wall time added.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import chdb
import clickhouse_connect
import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from fleetlens.config import WarehouseURL
from fleetlens.warehouse.client import WarehouseUnavailable, wait_until_ready

TABLE = "bench_traces"
COLUMNS = {
    "Timestamp": "DateTime64(9)",
    "TraceId": "String",
    "SpanId": "String",
    "SpanName": "LowCardinality(String)",
    "ServiceName": "LowCardinality(String)",
    "SpanAttributes": "Map(LowCardinality(String), String)",
    "Duration": "UInt64",
}
DDL = f"""
CREATE TABLE IF NOT EXISTS default.{TABLE} (
    Timestamp DateTime64(9) CODEC(Delta(8), ZSTD(1)),
    TraceId String CODEC(ZSTD(1)),
    SpanId String CODEC(ZSTD(1)),
    SpanName LowCardinality(String) CODEC(ZSTD(1)),
    ServiceName LowCardinality(String) CODEC(ZSTD(1)),
    SpanAttributes Map(LowCardinality(String), String) CODEC(ZSTD(1)),
    Duration UInt64 CODEC(T64, ZSTD(1)),
    INDEX idx_trace_id TraceId TYPE bloom_filter(0.001) GRANULARITY 1,
    INDEX idx_span_attr_key mapKeys(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_span_attr_value mapValues(SpanAttributes) TYPE bloom_filter(0.01) GRANULARITY 1,
    INDEX idx_duration Duration TYPE minmax GRANULARITY 1
) ENGINE = MergeTree
PARTITION BY toDate(Timestamp)
ORDER BY (ServiceName, SpanName, toDateTime(Timestamp), Timestamp)
SETTINGS index_granularity = 8192
"""
PIECE = 1 << 20  # what the server hands the engine per append (app.INSERT_BATCH)

console = Console(width=140)


# -- data ---------------------------------------------------------------------------------


def make_frame(rows: int, seed: int = 42) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    base = np.datetime64("2026-01-15T10:00:00", "ns")
    timestamps = base + np.sort(rng.integers(0, 3600 * 10**9, rows)).astype("timedelta64[ns]")
    traces = max(1, rows // 8)
    trace_hex = rng.bytes(16 * traces).hex()
    trace_ids = np.array([trace_hex[i * 32:(i + 1) * 32] for i in range(traces)], dtype=object)
    span_hex = rng.bytes(8 * rows).hex()
    span_ids = [span_hex[i * 16:(i + 1) * 16] for i in range(rows)]
    services = np.array([f"svc-{name}" for name in ("api", "auth", "billing", "cart", "catalog", "checkout",
                                                      "email", "gateway", "inventory", "payments", "search",
                                                      "shipping")], dtype=object)
    span_names = np.array([f"{verb} /{noun}" for verb in ("GET", "POST", "PUT", "DELETE")
                           for noun in ("users", "orders", "items", "carts", "sessions", "prices", "stock",
                                        "quotes", "invoices", "events")], dtype=object)
    methods = ("GET", "POST", "PUT", "DELETE")
    codes = ("200", "200", "200", "201", "204", "400", "404", "500")
    attribute_pool = np.empty(4096, dtype=object)
    for k in range(len(attribute_pool)):
        attrs = {
            "http.method": methods[k % 4],
            "http.status_code": codes[k % len(codes)],
            "http.route": f"/api/v{k % 3}/resource/{k % 97}",
            "net.peer.name": f"10.0.{k % 16}.{k % 251}",
        }
        if k % 3 == 0:
            attrs["user.id"] = f"user-{k:06d}"
        attribute_pool[k] = attrs
    return pd.DataFrame({
        "Timestamp": timestamps,
        "TraceId": trace_ids[rng.integers(0, traces, rows)],
        "SpanId": span_ids,
        "SpanName": span_names[rng.integers(0, len(span_names), rows)],
        "ServiceName": services[rng.integers(0, len(services), rows)],
        "SpanAttributes": attribute_pool[rng.integers(0, len(attribute_pool), rows)],
        "Duration": rng.lognormal(15, 1.5, rows).astype(np.uint64),
    })


# -- server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fleetlens", "warehouse", "serve", "--path", str(path), "--port", str(port),
             "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        wait_until_ready(WarehouseURL.parse(f"http://127.0.0.1:{port}"), 60, alive=lambda: process.poll() is None)
    except WarehouseUnavailable as error:
        stop_server(process)
        raise RuntimeError(f"{error}: {log_path.read_text()[-2000:]}") from None
    return process


def stop_server(process: subprocess.Popen[bytes]) -> int | None:
    if process.poll() is not None:
        return process.returncode
    os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        return process.wait()


# -- measurements -------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def encode(client, df: pd.DataFrame, compression: str | None) -> bytes:
    """What clickhouse-connect's insert_df puts on the wire for `df` (its private transform)."""
    context = client.create_insert_context(TABLE, list(COLUMNS), column_type_names=list(COLUMNS.values()))
    context.data = df
    context.compression = compression
    return b"".join(client._transform.build_insert(context))  # noqa: SLF001 - encoding measured alone


def native_payload(client, df: pd.DataFrame) -> bytes:
    body = encode(client, df, None)
    head, sep, data = body.partition(b" FORMAT Native\n")
    if not sep or not head.startswith(b"INSERT INTO"):
        raise RuntimeError(f"unexpected clickhouse-connect insert body: {body[:200]!r}")
    return data


def insert_in_process(conn, payload: bytes) -> int:
    inserter = conn.send_insert(f"INSERT INTO default.{TABLE}", "Native")
    view = memoryview(payload)
    for offset in range(0, len(view), PIECE):
        inserter.append(bytes(view[offset:offset + PIECE]))
    return inserter.finish().rows_written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows, repeat = args.rows, args.repeat

    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="fleetlens-bench-"))
    port = free_port()
    server = start_server(workdir / "server", port, workdir / "server.log")
    try:
        console.print(f"server: pid {server.pid}, port {port}, data {workdir / 'server'}")
        frames: list[pd.DataFrame] = []
        generate_s = timed(lambda: frames.append(make_frame(rows)))
        df = frames[0]
        console.print(f"generated {rows:,} rows in {generate_s:.2f} s")

        clients = {name: clickhouse_connect.get_client(host="127.0.0.1", port=port, compress=compress,
                                                       send_receive_timeout=300)
                   for name, compress in (("none", False), ("lz4", "lz4"))}
        admin = clients["none"]
        admin.command(DDL)
        transform = type(admin._transform).__name__  # noqa: SLF001
        transform = "python Native codec" if transform == "NativeTransform" else f"{transform} (rust codec)"

        payload = native_payload(admin, df)
        console.print(f"Native payload: {len(payload) / 1e6:.1f} MB ({len(payload) / rows:.0f} B/row); "
                      f"clickhouse-connect {clickhouse_connect.__version__}, {transform}")

        times: dict[str, list[float]] = {"server none": [], "server lz4": [], "in-process": []}
        encode_times: dict[str, list[float]] = {"none": [], "lz4": []}
        wire_bytes: dict[str, int] = {}

        local_path = workdir / "inproc"
        conn = chdb.connect(str(local_path))
        try:
            conn.query(DDL)
            # Round 0 warms both engines up and is not counted. Each table is truncated right after
            # its insert is verified, so no background merge competes with the next measurement.
            for round_ in range(repeat + 1):
                for name, client in clients.items():
                    compression = None if name == "none" else name
                    t0 = time.perf_counter()
                    wire_bytes[name] = len(encode(client, df, compression))
                    encode_s = time.perf_counter() - t0

                    t0 = time.perf_counter()
                    summary = client.insert_df(TABLE, df)
                    insert_s = time.perf_counter() - t0
                    count = int(admin.command(f"SELECT count() FROM default.{TABLE}"))
                    admin.command(f"TRUNCATE TABLE default.{TABLE}")
                    if summary.written_rows != rows or count != rows:
                        raise RuntimeError(f"server {name}: wrote {summary.written_rows}, table has {count}")
                    if round_:
                        encode_times[name].append(encode_s)
                        times[f"server {name}"].append(insert_s)

                t0 = time.perf_counter()
                written = insert_in_process(conn, payload)
                insert_s = time.perf_counter() - t0
                count = int(conn.query(f"SELECT count() FROM default.{TABLE}", "TSV").bytes())
                conn.query(f"TRUNCATE TABLE default.{TABLE}")
                if written != rows or count != rows:
                    raise RuntimeError(f"in-process: wrote {written}, table has {count}")
                if round_:
                    times["in-process"].append(insert_s)
        finally:
            conn.close()
        for client in clients.values():
            client.close()
    finally:
        rc = stop_server(server)
        shutil.rmtree(workdir, ignore_errors=True)

    median = {name: statistics.median(values) for name, values in times.items()}
    rate = {name: rows / seconds for name, seconds in median.items()}
    table = Table(title=f"Native insert of {rows:,} otel_traces-like rows, median of {repeat} (after 1 warm-up round)")
    for column, justify in (("path", "left"), ("rows", "right"), ("seconds", "right"), ("rows/s", "right"),
                            ("body MB", "right"), ("overhead", "right"),
                            ("client encode s", "right"), ("encode share", "right")):
        table.add_column(column, justify=justify)
    for name in times:
        compression = name.split()[-1] if name.startswith("server") else None
        if compression:
            encode_s = statistics.median(encode_times[compression])
            encode_cells = (f"{encode_s:.3f}", f"{encode_s / median[name]:.0%}")
            body = wire_bytes[compression]
        else:
            encode_cells = ("-", "-")
            body = len(payload)
        label = f"server: insert_df, body {compression}" if compression else "in-process: chDB send_insert"
        table.add_row(label, f"{rows:,}", f"{median[name]:.3f}", f"{rate[name]:,.0f}", f"{body / 1e6:.1f}",
                      f"{rate['in-process'] / rate[name]:.2f}×", *encode_cells)
    console.print(table)
    console.print("overhead = in-process rows/s ÷ this path's rows/s; encode share = clickhouse-connect's "
                  "DataFrame→Native(+lz4) time, measured alone, ÷ this path's insert time")
    for name, values in times.items():
        console.print(f"  {name}: " + ", ".join(f"{v:.3f}" for v in values) + " s")
    console.print(f"server exit code after SIGTERM: {rc}; total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
