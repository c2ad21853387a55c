"""dbt build time of the models at scale, and cost reconciliation on the result (issue 5's bar:
full refresh of 10M requests ≤ 10 min, incremental build of one more hour of 100K requests ≤ 60 s).

    .venv/bin/python bench/dbt_build.py --requests 200000            # a quick check
    .venv/bin/python bench/dbt_build.py                               # the 10M case (the bar)
    .venv/bin/python bench/dbt_build.py --keep /var/tmp/fl-dbt-10m    # the 10M case; later runs
                                                                      #   with the same --keep skip synthesis

Starts `python -m fleetlens warehouse serve` on a free port and a temp dir (or --keep DIR), migrates
the `bench` database, then:

  synth        `--requests` requests from `--start`, seed `--seed`, through the direct warehouse path
               (write_to_warehouse: otel_traces + fleet_metrics), as `fleetlens synth` does. Not part of
               the bar; with --keep it runs once and later runs reuse the data (the extra hour of an
               earlier run is deleted first). The range ends where its last span ends.
  seed         `dbt seed` (the price catalog), into `bench_marts`.
  full         `dbt build --full-refresh --exclude-resource-type seed`: every model and its tests, over
               the whole range. run_results.json splits it into model (≈ `dbt run`) and test (≈ `dbt
               test`) time, summed per node (with 1 dbt thread the sums add up to the wall time).
  hour synth   one more hour, starting at the second after the range ends: `--hour-requests`
               requests, seed + 1 (another seed: the same one would repeat the first range's trace
               ids), replicas already up (no cold starts), the rate scaled by the traffic shape of that
               hour so the requests span ≈ 1 h.
  incremental  `dbt build --exclude-resource-type seed` (no --full-refresh): the incremental models
               recompute from their watermark (the day of newest row − lookback − max request hours).

After each build, reconciliation in `bench_marts` (SQL, through clickhouse-connect):
  (a) per replica-hour, max |busy_usd + idle_usd − bill_usd| over int_replica_hours (≤ $1e-6);
  (b) Σ fct_requests.allocated_usd = Σ int_replica_hours.busy_usd, and Σ fct_requests.fully_loaded_usd
      + stranded idle (idle_usd of the (model, hour) groups whose busy_usd sums to 0) = Σ bill_usd,
      to the cent;
  (c) count(fct_requests) = uniqExact(trace_id) = gateway root spans in stg_otel__spans
      (parent_span_id IS NULL, service_name 'fleetlens-gateway') = requests synthesized.

Besides wall time it reports CPU seconds of dbt (this process's waited-for children), of the server
process and of this process, the server's peak RSS per phase (VmHWM, reset before each phase) and the
load average: on a shared machine wall time moves with other people's load, CPU seconds much less.
The bars are for 10M requests; at other sizes they are printed for information.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import clickhouse_connect
import numpy as np
import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleetlens.collector.synth.fleet import default_fleet
from fleetlens.collector.synth.generate import NS_PER_S, Synthesizer, traffic_shape
from fleetlens.collector.synth.run import RunStats, write_to_warehouse
from fleetlens.config import Settings
from fleetlens.schema import RenderOptions, migrate
from fleetlens.semconv import GATEWAY_SERVICE
from fleetlens.transform import run_dbt

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
from synth_scale import cpu_seconds  # noqa: E402
from warehouse_insert import free_port, start_server, stop_server  # noqa: E402

DATABASE = "bench"
MARTS = f"{DATABASE}_marts"
MARKER = "dbt_build_bench.json"  # in --keep DIR: what the warehouse there holds
FULL_BAR_S, INCREMENTAL_BAR_S = 600.0, 60.0
BAR_REQUESTS = 10_000_000
DBT_TIMEOUT_S = 3600.0
console = Console(width=140)


# -- measuring ------------------------------------------------------------------------------------


def children_cpu() -> float:
    """CPU seconds of this process's children that have been waited for (dbt; not the server, which
    runs until the end)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux, own processes)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss(process: psutil.Process) -> int:
    """VmHWM (peak RSS since the last reset) in bytes, else the current RSS."""
    try:
        for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return process.memory_info().rss


@dataclass
class Phase:
    name: str
    wall_s: float = 0.0
    dbt_cpu_s: float | None = None
    server_cpu_s: float = 0.0
    own_cpu_s: float = 0.0
    server_peak_rss: int = 0
    ok: bool = True
    note: str = ""


@dataclass
class Meter:
    """Wall time, CPU seconds (dbt, server, this process) and server peak RSS of one phase."""

    server: psutil.Process
    me: psutil.Process = field(default_factory=psutil.Process)

    def __call__(self, name: str, *, dbt: bool = False) -> _Measured:
        return _Measured(self, Phase(name), dbt)


class _Measured:
    def __init__(self, meter: Meter, phase: Phase, dbt: bool) -> None:
        self.meter, self.phase, self.dbt = meter, phase, dbt

    def __enter__(self) -> Phase:
        reset_peak_rss(self.meter.server.pid)
        self.server0, self.own0, self.children0 = (cpu_seconds(self.meter.server), cpu_seconds(self.meter.me),
                                                   children_cpu())
        self.t0 = time.perf_counter()
        return self.phase

    def __exit__(self, *exc: object) -> None:
        phase = self.phase
        phase.wall_s = time.perf_counter() - self.t0
        phase.server_cpu_s = cpu_seconds(self.meter.server) - self.server0
        phase.own_cpu_s = cpu_seconds(self.meter.me) - self.own0
        if self.dbt:
            phase.dbt_cpu_s = children_cpu() - self.children0
        phase.server_peak_rss = peak_rss(self.meter.server)


# -- synthesis ------------------------------------------------------------------------------------


def synthesize(synth: Synthesizer, client, label: str, *, cold_starts: bool) -> RunStats:
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task(label, total=synth.n_requests)
        return write_to_warehouse(synth, client, database=DATABASE, cold_starts=cold_starts,
                                  progress=lambda frame: progress.advance(task, len(frame)))


def range_end_ns(client) -> int:
    """When the last span of the raw data ends (ns), and the last fleet_metrics sample, whichever is later."""
    spans = int(client.command(f"SELECT max(toUnixTimestamp64Nano(Timestamp) + Duration) FROM {DATABASE}.otel_traces"))
    samples = int(client.command(f"SELECT toUnixTimestamp64Nano(toDateTime64(max(ts), 9)) FROM {DATABASE}.fleet_metrics"))
    return max(spans, samples)


def iso(ns: int) -> str:
    return datetime.fromtimestamp(ns / NS_PER_S, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def raw_counts(client) -> tuple[int, int]:
    return (int(client.command(f"SELECT count() FROM {DATABASE}.otel_traces")),
            int(client.command(f"SELECT count() FROM {DATABASE}.fleet_metrics")))


def drop_after(client, end_ns: int) -> None:
    """Delete what an earlier run added after the base range (its extra hour): every span and sample
    from `end_ns` on. The base range has none there (it ends where its last span ends)."""
    at = f"fromUnixTimestamp64Nano(toInt64({end_ns}), 'UTC')"
    for table, column in (("otel_traces", "Timestamp"), ("fleet_metrics", "ts"), ("otel_traces_trace_id_ts", "Start")):
        client.command(f"ALTER TABLE {DATABASE}.{table} DELETE WHERE {column} >= {at}",
                       settings={"mutations_sync": 2})


def hour_rate(start_ns: int, requests: int) -> float:
    """The weekly-mean rate that puts `requests` arrivals in the hour from `start_ns` (the synthesizer's
    rate is modulated by a daily and weekly shape)."""
    minutes = start_ns + (np.arange(60, dtype=np.int64) * 60 + 30) * NS_PER_S
    return requests / 3600.0 / float(traffic_shape(minutes, default_fleet().traffic).mean())


# -- dbt ------------------------------------------------------------------------------------------


@dataclass
class Build:
    returncode: int
    elapsed_s: float | None
    by_type: dict[str, tuple[int, float]]  # resource type → (nodes, Σ execution_time)
    slowest: list[tuple[str, float, str]]
    failed: list[tuple[str, str, str]]  # node, status, message
    output_tail: str


def dbt(args: list[str], settings: Settings, verbose: bool) -> Build:
    results_path = settings.data_dir / "dbt" / "target" / "run_results.json"
    results_path.unlink(missing_ok=True)
    result = run_dbt(args, settings, capture=not verbose, timeout_s=DBT_TIMEOUT_S)
    output = (result.stdout or "") + (result.stderr or "")
    summary = output.rfind("Completed with")  # dbt's summary of what failed
    tail = output[summary:] if summary >= 0 else output[-3000:]
    if not results_path.exists():
        return Build(result.returncode, None, {}, [], [("(dbt)", "no run_results.json", "")], tail)
    data = json.loads(results_path.read_text())
    by_type: dict[str, tuple[int, float]] = {}
    nodes, failed = [], []
    for node in data.get("results", []):
        unique_id, seconds = node["unique_id"], float(node.get("execution_time") or 0.0)
        kind = unique_id.split(".", 1)[0]
        count, total = by_type.get(kind, (0, 0.0))
        by_type[kind] = (count + 1, total + seconds)
        nodes.append((unique_id, seconds, kind))
        if node.get("status") not in ("success", "pass", "skipped"):
            failed.append((unique_id, str(node.get("status")), (node.get("message") or "")[:300]))
    nodes.sort(key=lambda n: -n[1])
    return Build(result.returncode, data.get("elapsed_time"), by_type, nodes[:5], failed, tail)


def report_build(name: str, build: Build, phase: Phase) -> None:
    parts = [f"{kind} {count} nodes {seconds:.1f} s" for kind, (count, seconds) in sorted(build.by_type.items())]
    console.print(f"[bold]{name}[/bold]: exit {build.returncode}, wall {phase.wall_s:.1f} s"
                  + (f" (dbt elapsed {build.elapsed_s:.1f} s)" if build.elapsed_s is not None else "")
                  + "; Σ node execution_time: " + ", ".join(parts), highlight=False)
    if build.slowest:
        table = Table(title=f"{name}: slowest 5 nodes")
        table.add_column("node")
        table.add_column("type")
        table.add_column("s", justify="right")
        table.add_column("share of wall", justify="right")
        for unique_id, seconds, kind in build.slowest:
            table.add_row(unique_id.split(".", 2)[-1] if kind != "test" else unique_id.split(".")[2], kind,
                          f"{seconds:.1f}", f"{seconds / phase.wall_s:.0%}" if phase.wall_s else "-")
        console.print(table)
    if build.failed or build.returncode:
        for unique_id, status, message in build.failed:
            console.print(f"[red]  {status}: {unique_id}: {message}[/red]", highlight=False)
        if build.output_tail.strip():
            console.print(f"dbt output (tail):\n{build.output_tail.strip()[-3000:]}", highlight=False, markup=False)


# -- reconciliation -------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    detail: str
    ok: bool


def reconcile(client, expected_requests: int) -> list[Check]:
    def one(sql: str) -> tuple:
        return client.query(sql).result_rows[0]

    checks: list[Check] = []
    try:
        worst, replica_hours, bill = one(
            f"SELECT max(abs(busy_usd + idle_usd - bill_usd)), count(), sum(bill_usd) FROM {MARTS}.int_replica_hours")
        checks.append(Check("(a) replica-hour busy + idle = bill",
                            f"max |busy + idle − bill| = ${worst:.3g} over {replica_hours:,} replica-hours "
                            f"(bill ${bill:,.2f})", worst <= 1e-6))
        busy, idle = one(f"SELECT sum(busy_usd), sum(idle_usd) FROM {MARTS}.int_replica_hours")
        stranded, stranded_groups = one(
            f"SELECT sum(group_idle), count() FROM (SELECT model, hour, sum(busy_usd) AS group_busy, "
            f"sum(idle_usd) AS group_idle FROM {MARTS}.int_replica_hours GROUP BY model, hour) WHERE group_busy = 0")
        allocated, loaded, requests, traces = one(
            f"SELECT sum(allocated_usd), sum(fully_loaded_usd), count(), uniqExact(trace_id) FROM {MARTS}.fct_requests")
        checks.append(Check("(b) Σ allocated = Σ busy",
                            f"${allocated:,.4f} vs ${busy:,.4f}: Δ ${allocated - busy:+.6f}",
                            abs(allocated - busy) < 0.01))
        checks.append(Check("(b) Σ fully loaded + stranded idle = Σ bill",
                            f"${loaded:,.4f} + ${stranded:,.4f} ({stranded_groups:,} idle model-hours) vs "
                            f"${bill:,.4f}: Δ ${loaded + stranded - bill:+.6f} (idle ${idle:,.2f})",
                            abs(loaded + stranded - bill) < 0.01))
        (roots,) = one(f"SELECT count() FROM {MARTS}.stg_otel__spans WHERE parent_span_id IS NULL "
                       f"AND service_name = '{GATEWAY_SERVICE}'")
        checks.append(Check("(c) one fct_requests row per request",
                            f"count {requests:,}, uniqExact(trace_id) {traces:,}, gateway root spans {roots:,}, "
                            f"synthesized {expected_requests:,}",
                            requests == traces == roots == expected_requests))
    except Exception as error:  # noqa: BLE001 - a missing model is a failed check, reported
        checks.append(Check("reconciliation queries", f"{type(error).__name__}: {str(error)[:300]}", False))
    return checks


def report_checks(name: str, checks: list[Check]) -> None:
    table = Table(title=f"reconciliation after {name}")
    table.add_column("check")
    table.add_column("")
    table.add_column("numbers")
    for check in checks:
        table.add_row(check.name, "[green]PASS[/green]" if check.ok else "[red]FAIL[/red]", check.detail)
    console.print(table)


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=BAR_REQUESTS)
    parser.add_argument("--hour-requests", type=int, default=100_000, help="requests in the extra hour")
    parser.add_argument("--start", default="2026-11-02T00:00:00Z")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", type=Path, help="warehouse dir kept across runs (synthesis once)")
    parser.add_argument("--threads", type=int, default=1, help="dbt threads (FLEETLENS_DBT_THREADS)")
    parser.add_argument("--verbose", action="store_true", help="stream dbt's output instead of capturing it")
    args = parser.parse_args()

    load_start = os.getloadavg()
    console.print(f"load average at start: {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, "
                  f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB", highlight=False)
    os.environ["FLEETLENS_DBT_THREADS"] = str(args.threads)
    started = time.perf_counter()

    workdir = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="fleetlens-dbt-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    marker_path = workdir / MARKER
    wanted = {"requests": args.requests, "start": args.start, "seed": args.seed}
    marker = json.loads(marker_path.read_text()) if marker_path.exists() else None
    if marker is not None and {k: marker.get(k) for k in wanted} != wanted:
        sys.exit(f"{workdir} holds {marker}, not {wanted}: use another --keep dir or remove it")
    if marker is None and (workdir / "warehouse").exists():
        sys.exit(f"{workdir / 'warehouse'} exists but {MARKER} does not (an interrupted synthesis?): remove it")

    port = free_port()
    server = start_server(workdir / "warehouse", port, workdir / "server.log")
    phases: list[Phase] = []
    checks: dict[str, list[Check]] = {}
    try:
        console.print(f"server: pid {server.pid}, port {port}, data {workdir}", highlight=False)
        client = clickhouse_connect.get_client(host="127.0.0.1", port=port, compress="lz4", send_receive_timeout=900)
        migrate(client, RenderOptions(database=DATABASE))
        settings = Settings(data_dir=workdir, warehouse_url=f"http://127.0.0.1:{port}/{DATABASE}")
        meter = Meter(psutil.Process(server.pid))

        # 1. the base range
        if marker is None:
            synth = Synthesizer(args.seed, args.start, n_requests=args.requests)
            with meter(f"synth {args.requests:,} requests") as phase:
                stats = synthesize(synth, client, "synth", cold_starts=True)
            phase.note = (f"{stats.spans:,} spans, {stats.metric_rows:,} fleet_metrics rows, "
                          f"{stats.requests / phase.wall_s:,.0f} requests/s")
            phases.append(phase)
            spans, samples = raw_counts(client)
            if (spans, samples) != (stats.spans, stats.metric_rows):
                raise RuntimeError(f"stored {spans:,} spans / {samples:,} samples, wrote {stats.spans:,} / "
                                   f"{stats.metric_rows:,}")
            marker = {**wanted, "end_ns": range_end_ns(client), "spans": spans, "metric_rows": samples}
            if args.keep:
                marker_path.write_text(json.dumps(marker, indent=1) + "\n")
        else:
            with meter("reuse: drop the extra hour") as phase:
                drop_after(client, marker["end_ns"])
                client.command(f"DROP DATABASE IF EXISTS {MARTS}")
            spans, samples = raw_counts(client)
            phase.note = f"{spans:,} spans, {samples:,} fleet_metrics rows kept from an earlier run"
            phases.append(phase)
            if (spans, samples) != (marker["spans"], marker["metric_rows"]):
                raise RuntimeError(f"{workdir} holds {spans:,} spans / {samples:,} samples, its marker says "
                                   f"{marker['spans']:,} / {marker['metric_rows']:,}: remove it")
        end_ns = marker["end_ns"]
        console.print(f"base range: {args.requests:,} requests, {marker['spans']:,} spans, "
                      f"{marker['metric_rows']:,} fleet_metrics rows, {args.start} → {iso(end_ns)}", highlight=False)

        # 2. seeds, then the full refresh
        with meter("dbt seed", dbt=True) as phase:
            seed = dbt(["seed", "--full-refresh"], settings, args.verbose)
        phase.ok = seed.returncode == 0
        phases.append(phase)
        if not phase.ok:
            report_build("dbt seed", seed, phase)
            raise RuntimeError("dbt seed failed")

        with meter("full refresh: dbt build --full-refresh", dbt=True) as phase:
            full = dbt(["build", "--full-refresh", "--exclude-resource-type", "seed"], settings, args.verbose)
        phase.ok = full.returncode == 0
        phase.note = ", ".join(f"{k} {s:.1f} s" for k, (_, s) in sorted(full.by_type.items()))
        phases.append(phase)
        full_phase = phase
        report_build("full refresh", full, phase)
        checks["full refresh"] = reconcile(client, args.requests)
        report_checks("the full refresh", checks["full refresh"])

        # 3. one more hour, then the incremental build
        hour_start_ns = -(-(end_ns + 1) // NS_PER_S) * NS_PER_S  # the next whole second after the range
        rate = hour_rate(hour_start_ns, args.hour_requests)
        hour = Synthesizer(args.seed + 1, hour_start_ns, n_requests=args.hour_requests, rate=rate)
        with meter(f"synth one more hour, {args.hour_requests:,} requests") as phase:
            hour_stats = synthesize(hour, client, "one more hour", cold_starts=False)
        last = int(client.command(f"SELECT toUnixTimestamp64Nano(max(Timestamp)) FROM {DATABASE}.otel_traces "
                                  f"WHERE ParentSpanId = '' AND ServiceName = '{GATEWAY_SERVICE}'"))
        phase.note = (f"{iso(hour_start_ns)} → last arrival {iso(last)} ({(last - hour_start_ns) / 3.6e12:.2f} h), "
                      f"weekly-mean rate {rate:.1f}/s, {hour_stats.spans:,} spans")
        phases.append(phase)

        with meter("incremental: dbt build", dbt=True) as phase:
            incremental = dbt(["build", "--exclude-resource-type", "seed"], settings, args.verbose)
        phase.ok = incremental.returncode == 0
        phase.note = ", ".join(f"{k} {s:.1f} s" for k, (_, s) in sorted(incremental.by_type.items()))
        phases.append(phase)
        incremental_phase = phase
        report_build("incremental", incremental, phase)
        checks["incremental"] = reconcile(client, args.requests + args.hour_requests)
        report_checks("the incremental build", checks["incremental"])

        disk = client.query("SELECT database, sum(rows), sum(bytes_on_disk) FROM system.parts WHERE active AND "
                            f"database IN ('{DATABASE}', '{MARTS}') GROUP BY database ORDER BY database").result_rows
        server_rss = psutil.Process(server.pid).memory_info().rss
    finally:
        rc = stop_server(server)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    table = Table(title=f"FleetLens dbt build: {args.requests:,} requests + one hour of {args.hour_requests:,} "
                        f"(seed {args.seed}, {args.threads} dbt thread{'s' if args.threads > 1 else ''})")
    for column in ("phase", "wall s", "dbt CPU s", "server CPU s", "this process CPU s", "server peak RSS",
                   "notes"):
        table.add_column(column, justify="left" if column in ("phase", "notes") else "right")
    for phase in phases:
        table.add_row(phase.name if phase.ok else f"[red]{phase.name} (failed)[/red]", f"{phase.wall_s:.1f}",
                      "-" if phase.dbt_cpu_s is None else f"{phase.dbt_cpu_s:.1f}", f"{phase.server_cpu_s:.1f}",
                      f"{phase.own_cpu_s:.1f}", f"{phase.server_peak_rss / 2**30:.2f} GiB", phase.note)
    console.print(table)

    bars = Table(title="issue 5's bars" + ("" if args.requests == BAR_REQUESTS else
                                           f" (set for {BAR_REQUESTS:,} requests; this run has {args.requests:,})"))
    for column in ("bar", "measured", "limit", ""):
        bars.add_column(column, justify="left" if column == "bar" else "right")
    for name, phase, limit in (("full refresh (dbt build --full-refresh)", full_phase, FULL_BAR_S),
                               ("incremental, one more hour (dbt build)", incremental_phase, INCREMENTAL_BAR_S)):
        verdict = ("[green]PASS[/green]" if phase.wall_s <= limit else "[red]FAIL[/red]") if phase.ok else \
            "[red]FAIL (dbt failed)[/red]"
        bars.add_row(name, f"{phase.wall_s:.1f} s", f"≤ {limit:.0f} s", verdict)
    all_checks = [c for group in checks.values() for c in group]
    passed = sum(c.ok for c in all_checks)
    bars.add_row("reconciliation checks", f"{passed}/{len(all_checks)} pass", "all",
                 "[green]PASS[/green]" if passed == len(all_checks) else "[red]FAIL[/red]")
    console.print(bars)
    console.print("on disk: " + ", ".join(f"{db} {rows:,} rows {size / 1e6:,.0f} MB" for db, rows, size in disk)
                  + f"; server RSS at end {server_rss / 2**30:.2f} GiB", highlight=False)
    load_end = os.getloadavg()
    console.print(f"load average at start {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}, at end "
                  f"{load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}; total {time.perf_counter() - started:.0f} s; "
                  f"server exit code {rc}" + (f"; kept {workdir}" if args.keep else ""), highlight=False)


if __name__ == "__main__":
    main()
