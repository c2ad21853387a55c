"""`fleetlens demo` (the README's first command, after `make` sets up the venvs) for real: vLLM CPU
replicas of the demo models, the gateway, collector, embedded warehouse, Airflow building the marts,
the eval gate, the dashboards in headless Chromium — then Ctrl-C, and not one process of it is left.

One run of the whole thing (about 8 minutes here, with a minute of load): the figures the summary
prints come from the marts, the screenshot's figures from the page, and every process the demo
started carries its data dir in its environment, which is how the orphan check finds them all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import Output, child_env, free_port
from test_cli_up import _kill_tree

pytestmark = pytest.mark.slow


def _started_by(data_dir: Path) -> list[psutil.Process]:
    """Every live process whose environment names `data_dir` (or a folder in it, as the eval gate's
    processes do) as FleetLens' data dir: the demo's children, their children (vLLM's engine core,
    Airflow's tasks, Streamlit) — whatever their session."""
    found = []
    for process in psutil.process_iter():
        try:
            named = process.environ().get("FLEETLENS_DATA_DIR", "")
            if named and Path(named).resolve().is_relative_to(data_dir.resolve()) \
                    and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def test_demo_runs_the_fleet_end_to_end_and_ctrl_c_leaves_nothing_behind(tmp_path: Path, demo_models: Path) -> None:
    data = tmp_path / "data"
    env = child_env({
        "FLEETLENS_DATA_DIR": str(data), "COLUMNS": "160",
        "FLEETLENS_WAREHOUSE_SERVER__PORT": str(free_port()), "FLEETLENS_COLLECTOR__HTTP_PORT": str(free_port()),
        "FLEETLENS_COLLECTOR__GRPC_PORT": str(free_port()), "FLEETLENS_GATEWAY__PORT": str(free_port()),
        "FLEETLENS_AIRFLOW__PORT": str(free_port()), "FLEETLENS_DASHBOARDS__PORT": str(free_port()),
    })
    out = tmp_path / "demo.json"
    demo = subprocess.Popen([sys.executable, "-m", "fleetlens", "demo", "--minutes", "1", "--json-out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    stdout = Output(demo)
    try:
        output = stdout.wait_for("Press Ctrl-C", 1500, interval_s=1, tail=8000)
        outcome = json.loads(out.read_text())

        load, kpis, marts, gate = outcome["load"], outcome["kpis"], outcome["marts"], outcome["gate"]
        assert load["requests"] > 100 and load["errors"] == 0, load
        assert marts["state"] == "success" and not marts["failed"], marts
        # the overview's figures, from the marts the demo's Airflow run built
        assert kpis["requests"] >= load["requests"], (kpis, load)
        assert kpis["input_tokens"] > 0 and kpis["output_tokens"] > 0, kpis
        assert kpis["bill_usd"] > 0 and kpis["fully_loaded_usd"] > 0, kpis
        assert kpis["p95_ttft_ms"] > 0 and 0 < kpis["utilization"] <= 1, kpis
        # the gate judged the int8 change on both routes' slices
        assert gate["verdict"] in ("pass", "fail", "incomplete") and len(gate["units"]) == 2, gate
        assert Path(gate["report"]).read_text().startswith("#"), gate
        # headless Chromium saw the same non-zero figures on the overview
        shot = outcome["screenshot"]
        assert Path(shot["path"]).stat().st_size > 20_000
        shown = shot["shown"]
        assert shown["Requests"] not in ("0", "–") and shown["Tokens (in + out)"] not in ("0", "–"), shown
        assert shown["Fully loaded cost"] not in ("$0.00", "–") and shown["p95 TTFT"] != "–", shown
        assert shown["Fleet utilization"] not in ("0.0%", "–"), shown
        for figure in ("requests served", "spend (GPU bill)", "p95 TTFT", "fleet utilization", "eval gate"):
            assert figure in output, output[-6000:]
        for secret in (data / "gateway" / "api-keys").iterdir():
            assert secret.read_text().strip() not in output  # keys are in their files, never printed

        started = _started_by(data)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        for part in ("warehouse serve", "collector", "gateway", "serve replica", "vllm.entrypoints", "airflow",
                     "streamlit"):
            assert part in names, (part, names)
        os.killpg(demo.pid, signal.SIGINT)  # what Ctrl-C in its terminal does
        demo.wait(timeout=180)
        stdout.reader.join(timeout=10)
        assert demo.returncode == 0, stdout.text[-4000:]
        _, alive = psutil.wait_procs(started, timeout=15)
        assert not alive, alive
        assert not _started_by(data)
        assert not list((data / "replicas").glob("*.json"))  # replicas deregistered on the way out
    finally:
        for process in _started_by(data):
            try:
                process.kill()
            except psutil.Error:
                pass
        _kill_tree(demo)
