"""Throughput of `fleetlens synth`: generation alone, building otel_traces rows, and the direct
warehouse path (Arrow inserts into the embedded server, fleet_metrics included).

    .venv/bin/python bench/synth_scale.py [--requests 1000000] [--chunk 65536] [--no-metrics]
    .venv/bin/python bench/synth_scale.py --requests 10000000      # the 10M case

Starts `python -m fleetlens warehouse serve` on a free port and a temp dir (as
bench/warehouse_insert.py does), migrates it, then runs three timed passes over the same seed:

  generate  Synthesizer.requests() only (numpy, per chunk);
  build     + spans → Arrow `otel_traces` tables (no I/O);
  warehouse write_to_warehouse(): build, insert_arrow on a background thread, fleet_metrics too.

Besides wall time it reports CPU seconds of this process and of the server process: on a shared
machine wall time moves with other people's load, CPU seconds much less. The 10M extrapolation is
linear in requests from the warehouse pass.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import clickhouse_connect
import psutil
from rich.console import Console
from rich.table import Table

from fleetlens.collector.synth.direct import traces_table
from fleetlens.collector.synth.generate import Synthesizer
from fleetlens.collector.synth.run import write_to_warehouse
from fleetlens.schema import RenderOptions, migrate

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from warehouse_insert import free_port, start_server, stop_server  # noqa: E402

START = "2026-01-05T00:00:00Z"
console = Console(width=140)


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--chunk", type=int, default=65_536)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-metrics", action="store_true")
    parser.add_argument("--skip-build", action="store_true", help="skip the build-only pass (saves time at 10M)")
    args = parser.parse_args()
    n = args.requests
    me = psutil.Process()
    console.print(f"load average at start: {os.getloadavg()}, {psutil.cpu_count()} CPUs")

    def synth() -> Synthesizer:
        return Synthesizer(args.seed, START, n_requests=n)

    rows: list[tuple[str, int, int, float, float, float]] = []

    t0, c0 = time.perf_counter(), cpu_seconds(me)
    spans = sum(frame.span_count for frame in synth().requests(args.chunk))
    rows.append(("generate", n, spans, time.perf_counter() - t0, cpu_seconds(me) - c0, 0.0))
    console.print(f"generate: {rows[-1][3]:.1f} s", highlight=False)

    if not args.skip_build:
        t0, c0 = time.perf_counter(), cpu_seconds(me)
        built = sum(traces_table(frame).num_rows for frame in synth().requests(args.chunk))
        rows.append(("generate + build rows", n, built, time.perf_counter() - t0, cpu_seconds(me) - c0, 0.0))
        console.print(f"build: {rows[-1][3]:.1f} s", highlight=False)

    workdir = Path(tempfile.mkdtemp(prefix="fleetlens-synth-bench-"))
    port = free_port()
    server = start_server(workdir / "warehouse", port, workdir / "server.log")
    try:
        client = clickhouse_connect.get_client(host="127.0.0.1", port=port, compress="lz4",
                                               send_receive_timeout=900)
        migrate(client, RenderOptions(database="bench"))
        server_process = psutil.Process(server.pid)
        s0, t0, c0 = cpu_seconds(server_process), time.perf_counter(), cpu_seconds(me)
        stats = write_to_warehouse(synth(), client, database="bench", chunk=args.chunk, metrics=not args.no_metrics)
        wall = time.perf_counter() - t0
        rows.append(("warehouse (direct path)", n, stats.spans, wall, cpu_seconds(me) - c0,
                     cpu_seconds(server_process) - s0))
        stored = int(client.command("SELECT count() FROM bench.otel_traces"))
        metric_rows = int(client.command("SELECT count() FROM bench.fleet_metrics"))
        disk = client.query("SELECT table, sum(bytes_on_disk) FROM system.parts WHERE database = 'bench' AND active "
                            "GROUP BY table").result_rows
        if stored != stats.spans or metric_rows != stats.metric_rows:
            raise RuntimeError(f"stored {stored} spans / {metric_rows} metric rows, wrote {stats.spans} / "
                               f"{stats.metric_rows}")
    finally:
        rc = stop_server(server)
        shutil.rmtree(workdir, ignore_errors=True)

    table = Table(title=f"fleetlens synth: {n:,} requests, seed {args.seed}, chunk {args.chunk:,}")
    for column in ("pass", "requests", "spans", "wall s", "requests/s", "spans/s", "this process CPU s",
                   "server CPU s"):
        table.add_column(column, justify="left" if column == "pass" else "right")
    for name, requests, span_rows, seconds, cpu, server_cpu in rows:
        table.add_row(name, f"{requests:,}", f"{span_rows:,}", f"{seconds:.1f}", f"{requests / seconds:,.0f}",
                      f"{span_rows / seconds:,.0f}", f"{cpu:.1f}", f"{server_cpu:.1f}" if server_cpu else "-")
    console.print(table)
    console.print(f"fleet_metrics rows: {stats.metric_rows:,}; on disk: "
                  + ", ".join(f"{t} {b / 1e6:,.0f} MB" for t, b in disk))
    per_request = rows[-1][3] / n
    console.print(f"extrapolated 10M requests on the direct path: {per_request * 10_000_000 / 60:.1f} min "
                  f"(linear in requests); load average at end: {os.getloadavg()}; server exit code {rc}")


if __name__ == "__main__":
    main()
