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
    api_url = f"http://{_client_host(airflow.host)}:{airflow.port}"
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
    return f"http://{_client_host(settings.airflow.host)}:{settings.airflow.port}"


def passwords_file(settings: Settings) -> Path:
    """Where Airflow's simple auth manager writes the generated admin password (never printed)."""
    return settings.airflow_home / "simple_auth_manager_passwords.json.generated"


def _client_host(bind: str) -> str:
    return "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
