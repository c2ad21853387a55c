"""Running FleetLens' dbt project (`dbt_project/`) against the configured warehouse.

The profile in `dbt_project/profiles.yml` reads its connection from FLEETLENS_DBT_* environment
variables; `dbt_env` derives them from the warehouse URL, so `fleetlens dbt build`, the Airflow DAGs
and the tests all build against whatever FLEETLENS_WAREHOUSE_URL names (the embedded warehouse by
default), with the models in their own database beside the raw tables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from .config import Settings, WarehouseURL

PROJECT_DIR = Path(__file__).resolve().parent.parent / "dbt_project"


def models_database(url: WarehouseURL) -> str:
    """Where dbt builds: `{raw database}_marts`, beside the collector's tables."""
    return f"{url.database}_marts"


def dbt_env(url: WarehouseURL, work_dir: Path, *, schema: str | None = None) -> dict[str, str]:
    """The environment of a dbt run: connection, database names, and target/log paths under
    `work_dir` (not in the project, which may be read-only or shared by concurrent runs)."""
    return {
        "FLEETLENS_DBT_HOST": url.host,
        "FLEETLENS_DBT_PORT": str(url.port),
        "FLEETLENS_DBT_SECURE": str(url.secure),  # as_bool reads Python literals
        "FLEETLENS_DBT_USER": url.username,
        "FLEETLENS_DBT_PASSWORD": url.password.get_secret_value(),
        "FLEETLENS_DBT_SCHEMA": schema or models_database(url),
        "DBT_TARGET_PATH": str(work_dir / "target"),
        "DBT_LOG_PATH": str(work_dir / "logs"),
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "DO_NOT_TRACK": "1",
    }


def dbt_executable() -> str:
    """The `dbt` next to this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "dbt"
    return str(beside) if beside.exists() else "dbt"


def dbt_command(args: list[str], url: WarehouseURL) -> list[str]:
    """`dbt ARGS` for this project, with the raw database passed as the `raw_database` var.

    dbt takes one `--vars`: when ARGS has its own (e.g. a backfill's window_start / window_end),
    `raw_database` is added to it unless ARGS sets it."""
    args = list(args)
    subcommand = next((a for a in args if not a.startswith("-")), "")
    if subcommand not in ("", "clean", "deps", "debug", "init"):
        if "--vars" in args and args.index("--vars") + 1 < len(args):
            at = args.index("--vars") + 1
            given = yaml.safe_load(args[at]) or {}
            if not isinstance(given, dict):
                raise ValueError(f"--vars must be a YAML mapping, got {args[at]!r}")
            args[at] = json.dumps({"raw_database": url.database, **given})
        else:
            args += ["--vars", json.dumps({"raw_database": url.database})]
    return [dbt_executable(), "--no-use-colors", *args, "--project-dir", str(PROJECT_DIR),
            "--profiles-dir", str(PROJECT_DIR)]


def run_dbt(args: list[str], settings: Settings, *, schema: str | None = None, capture: bool = False,
            timeout_s: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run dbt on the project against `settings.warehouse`; its target/ and logs/ go to data_dir/dbt."""
    work_dir = (settings.data_dir / "dbt").resolve()  # dbt runs in the project dir: no relative paths
    work_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **dbt_env(settings.warehouse, work_dir, schema=schema)}
    return subprocess.run(dbt_command(args, settings.warehouse), cwd=PROJECT_DIR, env=env, text=True,
                          capture_output=capture, timeout=timeout_s, check=False)
