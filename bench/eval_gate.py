"""Wall time of `fleetlens eval gate` on this machine for the default suite (issue 7's bar: <= 10 minutes
including replica start-up).

    .venv/bin/python bench/eval_gate.py                  # demo-large -> int3 (the change the gate must fail)
    .venv/bin/python bench/eval_gate.py --change int8    # or: aa (same fleet both sides, --evaluate lookup)

The fleet is the committed demo fleet (serving/examples/demo-fleet); the candidate is the same fleet with
one edit. Before the clock starts: the demo models are built or reused (.cache/demo-models, minutes the
first time) and an embedded warehouse + collector come up in a temporary data dir (`fleetlens up
--no-serving --no-dashboards`), as they would already be running on a fleet. The clock covers the whole
`fleetlens eval gate` command: reading both sides, starting the vLLM replicas and the two gateways, the
suite (lookup_easy 50 + lookup_hard 3,000 items) on both sides, cost from the telemetry, the decision and
storing it. Prints the phases from the stored gate_decisions row.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import clickhouse_connect
import httpx
import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
FLEET = REPO / "serving" / "examples" / "demo-fleet"
BAR_S = 600.0
console = Console()


def free_port() -> int:
    from fleetlens.net import free_port as pick

    return pick()


def candidate_fleet(change: str, out: Path) -> str:
    """The candidate reference for `change`: a models.yaml or routes.yaml with one edit (paths absolute)."""
    from fleetlens.serving.registry import load_models

    registry = load_models(FLEET / "models.yaml").model_dump(mode="json", exclude_none=True)
    if change == "int3":
        registry["models"]["demo-large"].update(path=registry["models"]["demo-large-int3"]["path"], variant="int3")
        target = out / "models.yaml"
        target.write_text(yaml.safe_dump(registry, sort_keys=False))
        return str(target)
    if change == "int8":
        routes = yaml.safe_load((FLEET / "routes.yaml").read_text())
        for route in routes["features"].values():
            route["model"] = "demo-large-int8"
        registry["models"]["demo-large-int8"]["replicas"] = 1
        (out / "models.yaml").write_text(yaml.safe_dump(registry, sort_keys=False))
        (out / "routes.yaml").write_text(yaml.safe_dump(routes, sort_keys=False))
        return str(out)
    return str(FLEET)  # aa


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--change", choices=("int3", "int8", "aa"), default="int3")
    args = parser.parse_args()

    from fleetlens.serving.demo_models import make_demo

    started = time.monotonic()
    built = make_demo(REPO / ".cache" / "demo-models", seed=0, threads=2)
    console.print(f"demo models {'reused' if built.cached else 'built'} in {time.monotonic() - started:.0f} s")

    with tempfile.TemporaryDirectory(prefix="fl-bench-gate-") as tmp_name:
        tmp = Path(tmp_name)
        ports = {"wh": free_port(), "http": free_port(), "grpc": free_port()}
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETLENS_")}
        env.update(FLEETLENS_DATA_DIR=str(tmp / "data"), FLEETLENS_WAREHOUSE_SERVER__PORT=str(ports["wh"]),
                   FLEETLENS_COLLECTOR__HTTP_PORT=str(ports["http"]), FLEETLENS_COLLECTOR__GRPC_PORT=str(ports["grpc"]),
                   FLEETLENS_GATEWAY__MODELS_FILE=str(FLEET / "models.yaml"),
                   FLEETLENS_GATEWAY__ROUTES_FILE=str(FLEET / "routes.yaml"))
        with open(tmp / "up.log", "wb") as log:
            up = subprocess.Popen([sys.executable, "-m", "fleetlens", "up", "--no-serving", "--no-dashboards"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not _healthy(f"http://127.0.0.1:{ports['http']}/health"):
                if up.poll() is not None or time.monotonic() > deadline:
                    console.print(f"[red]the stack did not start:[/red]\n{(tmp / 'up.log').read_text()[-2000:]}")
                    return 1
                time.sleep(0.5)
            candidate = candidate_fleet(args.change, tmp)
            extra = ["--evaluate", "lookup"] if args.change == "aa" else []
            command = [sys.executable, "-m", "fleetlens", "eval", "gate", "--baseline", str(FLEET),
                       "--candidate", candidate, "--report-out", str(tmp / "report.md"), *extra]
            console.print(f"$ fleetlens eval gate --baseline {FLEET.relative_to(REPO)} --candidate {args.change} "
                          + " ".join(extra))
            clock = time.monotonic()
            gate = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
            wall = time.monotonic() - clock
            output = gate.stdout + gate.stderr
            stored = re.search(r"stored gate decision ([0-9a-f]{32})", output)
            if not stored:
                console.print(output[-3000:])
                console.print(f"[red]the gate stored no decision (exit {gate.returncode})[/red]")
                return 1
            client = clickhouse_connect.get_client(host="127.0.0.1", port=ports["wh"], database="fleetlens")
            (details,) = client.query("SELECT details FROM gate_decisions WHERE gate_id = {g:String}",
                                      parameters={"g": stored.group(1)}).result_rows[0]
            report(json.loads(details), wall, gate.returncode)
        finally:
            os.killpg(up.pid, 15)
            up.wait(timeout=60)
    return 0 if wall <= BAR_S else 1


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def report(details: dict, wall: float, code: int) -> None:
    table = Table(title="fleetlens eval gate, default suite (this machine)")
    table.add_column("phase")
    table.add_column("value", justify="right")
    for replica in details["replicas"]:
        table.add_row(f"replica {replica['name']} ({replica['model']}) ready after", f"{replica['load_s']:.1f} s")
    table.add_row("start-up (replicas in parallel + gateways + probes)", f"{details['startup_s']:.1f} s")
    for unit in details["units"]:
        for task in unit["tasks"]:
            table.add_row(f"{unit['kind']} {unit['target']}: {task['task']} (n {task['n']:,})",
                          f"{100 * task['baseline_mean']:.2f}% -> {100 * task['candidate_mean']:.2f}%  {task['verdict']}")
    for budget in details["budgets"]:
        change = "-" if budget["increase"] is None else f"{budget['increase']:+.1%}"
        table.add_row(f"{budget['check']}", f"{change}  {budget['verdict'] if budget['counted'] else 'not counted'}")
    table.add_row("gate verdict (exit code)", f"{details['verdict']} ({code})")
    table.add_row("[bold]whole command, wall[/bold]", f"[bold]{wall:.1f} s[/bold]")
    table.add_row("bar", f"<= {BAR_S:.0f} s: {'PASS' if wall <= BAR_S else 'FAIL'}")
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
