"""Airflow as FleetLens runs it: one AIRFLOW_HOME under the data dir, the DAGs of this package, and
settings sized for a small machine. `fleetlens up --airflow` and `fleetlens airflow ...` both start
Airflow with `airflow_env(settings)`, so the CLI, the scheduler and the tasks agree on everything.

Airflow reads its configuration from AIRFLOW__SECTION__KEY variables, which beat airflow.cfg; the
ones set here are those FleetLens decides (where things live, how much runs at once, what binds
where). Anything else can still be set the same way by the user.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import dags
from .config import Settings
from .net import client_host

# The `fleetlens.dags` package's folder: the repository's dags/ in a checkout, site-packages otherwise.
DAGS_FOLDER = Path(dags.__file__).resolve().parent


def airflow_executable() -> str:
    """The `airflow` beside this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "airflow"
    return str(beside) if beside.exists() else "airflow"


def airflow_env(settings: Settings) -> dict[str, str]:
    """Environment of every Airflow process FleetLens starts (and of `fleetlens airflow ...`)."""
    home = settings.airflow_home
    airflow = settings.airflow
    database_url = (airflow.database_url.get_secret_value() if airflow.database_url
                    else f"sqlite:///{home / 'airflow.db'}")
    api_url = f"http://{client_host(airflow.host)}:{airflow.port}"
    venv_bin = str(Path(sys.executable).parent)
    return {
        "AIRFLOW_HOME": str(home),
        # The DAG files read FleetLens settings at parse time; pin the data dir so the scheduler,
        # the dag-processor and the tasks see the same one whatever their working directory.
        "FLEETLENS_DATA_DIR": str(settings.data_dir.resolve()),
        "PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),  # standalone starts `airflow ...` by name
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": str(airflow.parallelism),
        "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(airflow.parallelism),
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": str(airflow.dags_paused_at_creation),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
        "AIRFLOW__API__HOST": airflow.host,
        "AIRFLOW__API__PORT": str(airflow.port),
        "AIRFLOW__API__BASE_URL": api_url,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
        "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
        "AIRFLOW__COSMOS__CACHE_DIR": str(home / "cosmos"),
        "AIRFLOW__COSMOS__ENABLE_TELEMETRY": "False",  # nothing phones home
        "SCARF_NO_ANALYTICS": "true",
        "DO_NOT_TRACK": "1",
    }


def standalone_argv() -> list[str]:
    """`airflow standalone`: metadata DB migration, API server + UI, scheduler, dag-processor and
    triggerer in one process tree (a single machine; production runs them as separate services)."""
    return [airflow_executable(), "standalone"]


def api_url(settings: Settings) -> str:
    return f"http://{client_host(settings.airflow.host)}:{settings.airflow.port}"


def passwords_file(settings: Settings) -> Path:
    """Where Airflow's simple auth manager writes the generated admin password (never printed)."""
    return settings.airflow_home / "simple_auth_manager_passwords.json.generated"




class AirflowAPI:
    """The few calls of Airflow's REST API (v2) FleetLens makes to a running Airflow: a token from the
    simple auth manager's generated admin password, then DAGs and DAG runs."""

    def __init__(self, settings: Settings, timeout_s: float = 30.0) -> None:
        import httpx

        self.base = api_url(settings)
        self._http = httpx.Client(base_url=self.base, timeout=timeout_s)
        self._settings = settings

    def login(self) -> None:
        import json

        password = json.loads(passwords_file(self._settings).read_text())["admin"]
        response = self._http.post("/auth/token", json={"username": "admin", "password": password})
        response.raise_for_status()
        self._http.headers["Authorization"] = f"Bearer {response.json()['access_token']}"

    def dag(self, dag_id: str) -> dict | None:
        """The DAG as Airflow knows it, None until the dag-processor has parsed it."""
        response = self._http.get(f"/api/v2/dags/{dag_id}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return response.json()

    def set_paused(self, dag_id: str, paused: bool) -> None:
        self._http.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": paused}).raise_for_status()

    def trigger(self, dag_id: str, *, logical_date: str, interval: tuple[str, str], conf: dict) -> dict | None:
        """Queue a run with this logical date and data interval (ISO timestamps with a zone); None when
        a run with that logical date exists already (409)."""
        response = self._http.post(f"/api/v2/dags/{dag_id}/dagRuns", json={
            "logical_date": logical_date, "data_interval_start": interval[0], "data_interval_end": interval[1],
            "conf": conf, "note": "fleetlens demo"})
        if response.status_code == 409:
            return None
        response.raise_for_status()
        return response.json()

    def run(self, dag_id: str, run_id: str) -> dict:
        response = self._http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
        response.raise_for_status()
        return response.json()

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        """task id -> state (None: not scheduled yet) of every task instance of the run."""
        response = self._http.get(f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances",
                                  params={"limit": 1000})
        response.raise_for_status()
        return {ti["task_id"]: ti["state"] for ti in response.json()["task_instances"]}

    def close(self) -> None:
        self._http.close()
