"""Every dashboard page's queries on 10M synthesized requests: p50 / p95 / max per page (issue 6's
bar: p95 ≤ 1 s per page on this machine; goal ≤ 300 ms).

    .venv/bin/python bench/dashboard_queries.py                         # uses /var/tmp/fl-dbt-10m
    .venv/bin/python bench/dashboard_queries.py --keep DIR --repeat 10

The data is what `bench/dbt_build.py --keep DIR` leaves there (10M requests synthesized over ~5 days,
every model built into `bench_marts`); when DIR does not hold it yet, that bench runs first (≈ 15 min).
Then `fleetlens warehouse serve` on DIR, and for each page the functions it calls (dashboards/queries.py:
the same code the pages run, without Streamlit's result cache — every sample is a cold query), under
four filter scenarios a user would pick, each `--repeat` times:

  last 7 days     the default range, no filter
  whole range     every day of data
  one customer    the whole range, the busiest customer (marts without a customer column fall back to
                  fct_requests, 10M rows: the slow path)
  feature+model   the whole range, one feature and one model

The sidebar's own queries (freshness, filter options) run on every page and are timed as a row of
their own; the trace explorer also opens the first request it finds (its spans from otel_traces).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))  # bench/ is not a package

from fleetlens.config import Settings  # noqa: E402
from fleetlens.dashboards import queries  # noqa: E402
from fleetlens.dashboards.filters import Filters  # noqa: E402
from fleetlens.dashboards.warehouse import DashboardWarehouse  # noqa: E402
from warehouse_insert import free_port, start_server, stop_server  # noqa: E402

DATABASE = "bench"          # what bench/dbt_build.py writes
MARKER = "dbt_build_bench.json"
BAR_S, GOAL_S = 1.0, 0.3

console = Console()


def ensure_data(keep: Path) -> None:
    if (keep / MARKER).is_file():
        return
    console.print(f"{keep} holds no built 10M data yet: running bench/dbt_build.py --keep {keep} first")
    subprocess.run([sys.executable, str(REPO / "bench" / "dbt_build.py"), "--keep", str(keep)], check=True)


def scenarios(wh: DashboardWarehouse) -> dict[str, Filters]:
    options = queries.filter_options(wh)
    first, last = options["dates"]
    customer, feature, model = wh.rows("""
        SELECT (SELECT customer FROM $marts.fct_requests WHERE customer IS NOT NULL GROUP BY customer
                ORDER BY count() DESC LIMIT 1),
               (SELECT feature FROM $marts.cost_by_feature_daily GROUP BY feature ORDER BY sum(requests) DESC LIMIT 1),
               (SELECT model FROM $marts.cost_per_1k_tokens GROUP BY model ORDER BY sum(requests) DESC LIMIT 1)""")[0]
    return {
        "last 7 days": Filters(start=max(first, last - timedelta(days=6)), end=last),
        "whole range": Filters(start=first, end=last),
        "one customer": Filters(start=first, end=last, customers=(customer,)),
        "feature+model": Filters(start=first, end=last, features=(feature,), models=(model,)),
    }


def page_calls(wh: DashboardWarehouse) -> dict[str, object]:
    """Page → f(filters): everything that page queries on open (the sidebar separately)."""
    calls: dict[str, object] = {name: (lambda f, fn=fn: fn(wh, f)) for name, fn in queries.PAGE_QUERIES.items()}

    def trace_explorer(f: Filters) -> None:
        found = queries.find_requests(wh, f, order="slowest")
        if not found.empty:
            queries.trace_spans(wh, found["trace_id"].iloc[0])

    calls["Trace explorer"] = trace_explorer

    def sidebar(f: Filters) -> None:
        wh.freshness()
        queries.filter_options(wh)

    calls["(sidebar, every page)"] = sidebar
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, default=Path("/var/tmp/fl-dbt-10m"),
                        help="warehouse dir with bench/dbt_build.py's data (made when missing)")
    parser.add_argument("--repeat", type=int, default=5, help="samples per page and scenario")
    args = parser.parse_args()
    ensure_data(args.keep)
    marker = json.loads((args.keep / MARKER).read_text())
    port = free_port()
    server = start_server(args.keep / "warehouse", port, args.keep / "server.log")
    try:
        wh = DashboardWarehouse.from_settings(Settings(warehouse_url=f"http://default@127.0.0.1:{port}/{DATABASE}"))
        requests = wh.rows("SELECT count() FROM $marts.fct_requests")[0][0]
        console.print(f"warehouse {args.keep}: {requests:,} requests in fct_requests "
                      f"({marker.get('requests', '?'):,} synthesized); load {os.getloadavg()[0]:.2f}")
        cases = scenarios(wh)
        calls = page_calls(wh)
        for call in calls.values():  # one warm-up round: first-touch of the parts, not a user's latency
            call(cases["last 7 days"])
        table = Table(title=f"dashboard page queries, {requests:,} requests ({args.repeat} × {len(cases)} scenarios per page)")
        for column in ("page", "p50 ms", "p95 ms", "max ms", "slowest scenario", f"p95 ≤ {BAR_S * 1000:.0f} ms",
                       f"goal ≤ {GOAL_S * 1000:.0f} ms"):
            table.add_column(column, justify="right" if "ms" in column else "left")
        failed = False
        for page, call in calls.items():
            samples: list[tuple[float, str]] = []
            for name, filters in cases.items():
                for _ in range(args.repeat):
                    started = time.perf_counter()
                    call(filters)
                    samples.append((time.perf_counter() - started, name))
            times = sorted(s for s, _ in samples)
            p95 = times[max(0, int(round(0.95 * len(times))) - 1)]
            slowest = max(samples)[1]
            ok = p95 <= BAR_S
            failed |= not ok
            table.add_row(page, f"{statistics.median(times) * 1000:.0f}", f"{p95 * 1000:.0f}",
                          f"{times[-1] * 1000:.0f}", slowest, "PASS" if ok else "FAIL",
                          "yes" if p95 <= GOAL_S else "no")
        console.print(table)
        console.print(f"load average at end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        sys.exit(1 if failed else 0)
    finally:
        stop_server(server)


if __name__ == "__main__":
    main()
