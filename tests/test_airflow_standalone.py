"""`fleetlens up --airflow`: Airflow standalone serves FleetLens' DAGs over its REST API (Airflow 3,
simple auth manager, loopback only), `fleetlens airflow ...` reaches the same Airflow, and stopping
`up` leaves no Airflow process behind, not even a running task (tasks get their own process group)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from conftest import Output, child_env, free_port
from fleetlens.stack import session_members
from test_cli_up import _kill_tree
from test_dags import share_dbt_manifests

EXPECTED_DAGS = {"fleetlens_hourly", "fleetlens_nightly_evals", "fleetlens_retention"}


def _airflow_processes(up: subprocess.Popen) -> list[psutil.Process]:
    """Everything `up` started for Airflow: the standalone tree, and any task in its session that
    left the tree's process group."""
    for child in psutil.Process(up.pid).children():
        if "standalone" in " ".join(child.cmdline()):
            return [child, *child.children(recursive=True), *session_members(child.pid)]
    return []


@pytest.mark.slow
def test_up_with_airflow_serves_the_dags_and_stops_without_orphans(tmp_path):
    port, airflow_port = free_port(), free_port()
    data = tmp_path / "data"
    share_dbt_manifests(data)
    env = child_env({"FLEETLENS_DATA_DIR": str(data), "COLUMNS": "200", "FLEETLENS_AIRFLOW__PORT": str(airflow_port),
                     "FLEETLENS_COLLECTOR__HTTP_PORT": str(free_port()), "FLEETLENS_COLLECTOR__GRPC_PORT": str(free_port())})
    up = subprocess.Popen([sys.executable, "-m", "fleetlens", "up", "--port", str(port), "--no-serving", "--airflow"],
                          cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True)
    stdout = Output(up)
    base = f"http://127.0.0.1:{airflow_port}"
    try:
        output = stdout.wait_for("Press Ctrl-C", 150)
        assert f"airflow (UI, API) │ {base}" in output, output
        password_file = data / "airflow" / "simple_auth_manager_passwords.json.generated"
        password = json.loads(password_file.read_text())["admin"]
        assert password not in output  # where the password is, never the password

        # secure by default: loopback only, and the API wants a token
        listening = {c.laddr.ip for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == airflow_port}
        assert listening == {"127.0.0.1"}, listening
        assert httpx.get(f"{base}/api/v2/dags", timeout=10).status_code == 401
        token = httpx.post(f"{base}/auth/token", json={"username": "admin", "password": password},
                           timeout=10).json()["access_token"]
        auth = {"Authorization": f"Bearer {token}"}

        deadline = time.monotonic() + 90  # the dag-processor parses dags/ a few seconds after start
        while True:
            dags = httpx.get(f"{base}/api/v2/dags", headers=auth, timeout=10).json()["dags"]
            if {d["dag_id"] for d in dags} >= EXPECTED_DAGS or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert {d["dag_id"] for d in dags} == EXPECTED_DAGS, dags
        assert not any(d["is_paused"] for d in dags)  # airflow.dags_paused_at_creation is off
        errors = httpx.get(f"{base}/api/v2/importErrors", headers=auth, timeout=10).json()
        assert errors["total_entries"] == 0, errors

        # `fleetlens airflow ...` talks to the same Airflow: a backfill of the hourly DAG is planned per hour
        cli = subprocess.run([sys.executable, "-m", "fleetlens", "airflow", "backfill", "create", "--dag-id",
                              "fleetlens_hourly", "--from-date", "2025-06-01T00:00:00+00:00", "--to-date",
                              "2025-06-01T03:00:00+00:00", "--dry-run"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stdout[-3000:] + cli.stderr[-3000:]
        assert all(f"2025-06-01 0{h}:00:00+00:00" in cli.stdout for h in range(4)), cli.stdout

        # The hourly DAG is unpaused: its first run starts at once. Stop while one of its tasks runs, in
        # its own process group (Airflow's task supervisor), the case a process-group kill alone misses.
        deadline = time.monotonic() + 60
        while not any(p.pid != p.ppid() and _own_group(p) for p in _airflow_processes(up)[1:]):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        started = _airflow_processes(up)
        assert len(started) >= 4, started  # standalone, scheduler, dag-processor, api-server, ...
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
        stdout.reader.join(timeout=10)
        assert up.returncode == 0, stdout.text
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive, alive
        assert not session_members(started[0].pid)
    finally:
        _kill_tree(up)


def _own_group(process: psutil.Process) -> bool:
    """True for a task process: in the standalone's session but its own process group."""
    try:
        return os.getpgid(process.pid) == process.pid
    except (ProcessLookupError, psutil.Error):
        return False
