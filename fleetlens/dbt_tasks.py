"""What the `fleetlens_hourly` DAG's dbt tasks (astronomer-cosmos operators) need.

At parse time: the dbt graph, from a `manifest.json` (cosmos LoadMode.DBT_MANIFEST). Cosmos' own
file parser (LoadMode.CUSTOM) misses `ref()`s made inside macros, which this project uses, and
would order the tasks wrongly; `dbt ls` at every parse takes seconds. The manifest comes from
`dbt parse`, kept under the data dir per content hash of the project (and dbt version), made by
`fleetlens up --airflow` before Airflow starts, so a DAG parse only reads a file. Only a parse
after the project changed runs `dbt parse` once (~6 s on 2 cores) and then never again for it.

At run time: the connection, resolved by the interceptor `use_configured_warehouse`, so the
warehouse password is never part of the parsed or serialized DAG, and a changed
FLEETLENS_WAREHOUSE_URL applies to the next task without a re-parse.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .config import Settings, load_settings
from .transform import PROJECT_DIR, dbt_env, dbt_executable

log = logging.getLogger("fleetlens.dbt_tasks")

PROFILE_NAME = "fleetlens"
TARGET_NAME = "warehouse"


def dbt_project_dir(settings: Settings) -> Path:
    """The dbt project the DAGs build: `airflow.dbt_project_dir`, else the one shipped with FleetLens."""
    return (settings.airflow.dbt_project_dir or PROJECT_DIR).resolve()


# Not part of the project's content: dbt's outputs and installed packages.
_NOT_SOURCE = {"target", "logs", "dbt_packages", "__pycache__"}
_MANIFESTS_KEPT = 3


class ManifestError(RuntimeError):
    """`dbt parse` failed: the project does not parse (its output says why)."""


def project_fingerprint(project_dir: Path) -> str:
    """A hash of every source file of the dbt project (paths and contents) and of dbt's version, so a
    manifest is reused exactly as long as nothing that dbt parses has changed."""
    digest = hashlib.sha256(importlib.metadata.version("dbt-core").encode() + b"\0")
    files: list[Path] = []
    for folder, subfolders, names in os.walk(project_dir):
        subfolders[:] = [d for d in subfolders if d not in _NOT_SOURCE and not d.startswith(".")]
        files.extend(Path(folder) / name for name in names)
    for path in sorted(files):
        digest.update(str(path.relative_to(project_dir)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def manifests_dir(settings: Settings) -> Path:
    return settings.data_dir.resolve() / "dbt" / "manifests"


def ensure_manifest(project_dir: Path, cache_dir: Path, *, timeout_s: float = 300.0) -> Path:
    """The `manifest.json` of `project_dir` as it is now: the cached one, or a fresh `dbt parse`
    (no warehouse needed). Written to a temporary folder and renamed, so concurrent parsers never
    read half a file; only the newest few manifests are kept."""
    target = cache_dir / project_fingerprint(project_dir)
    manifest = target / "manifest.json"
    if manifest.is_file():
        return manifest
    cache_dir.mkdir(parents=True, exist_ok=True)
    log.info("dbt project %s changed: dbt parse into %s", project_dir, target)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".parse-") as scratch:
        env = {**os.environ, "DBT_SEND_ANONYMOUS_USAGE_STATS": "false", "DO_NOT_TRACK": "1"}
        command = [dbt_executable(), "--no-use-colors", "parse", "--project-dir", str(project_dir),
                   "--profiles-dir", str(project_dir), "--profile", PROFILE_NAME, "--target", TARGET_NAME,
                   "--target-path", str(Path(scratch) / "target"), "--log-path", str(Path(scratch) / "logs")]
        result = subprocess.run(command, cwd=project_dir, env=env, capture_output=True, text=True, timeout=timeout_s,
                                check=False)
        if result.returncode != 0:
            raise ManifestError(f"dbt parse of {project_dir} failed (exit {result.returncode}):\n"
                                f"{result.stdout[-4000:]}{result.stderr[-2000:]}")
        built = Path(scratch) / "built"
        built.mkdir()
        shutil.move(str(Path(scratch) / "target" / "manifest.json"), built / "manifest.json")
        try:
            built.rename(target)
        except OSError:  # another parser got there first: same content, keep theirs
            if not manifest.is_file():
                raise
    _prune(cache_dir)
    return manifest


def _prune(cache_dir: Path) -> None:
    kept = sorted((d for d in cache_dir.iterdir() if d.is_dir() and not d.name.startswith(".")),
                  key=lambda d: d.stat().st_mtime, reverse=True)
    for old in kept[_MANIFESTS_KEPT:]:
        shutil.rmtree(old, ignore_errors=True)


def partial_parse_cache(group: Any) -> Path | None:
    """The cache folder cosmos gave the tasks of a DbtTaskGroup (where dbt's partial_parse.msgpack
    is kept between tasks), so a task outside the group can share it."""
    for task in getattr(group, "children", {}).values():
        cache_dir = getattr(task, "cache_dir", None)
        if cache_dir is not None:
            return Path(cache_dir)
    return None


def window_vars(start: datetime | None, end: datetime | None) -> dict[str, str]:
    """dbt vars `window_start` / `window_end` for a data interval, as ISO-8601 UTC strings. The models
    rebuild the whole days the window touches; without them they fall back to their own watermark."""
    if start is None or end is None:
        return {}
    return {"window_start": _iso_utc(start), "window_end": _iso_utc(end)}


def _iso_utc(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat()


def dbt_runtime(settings: Settings, context: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, Any]]:
    """(environment, dbt vars) of one dbt task: the profile's connection to `settings.warehouse`,
    the raw database, and the run's data interval."""
    work_dir = settings.data_dir.resolve() / "dbt"
    work_dir.mkdir(parents=True, exist_ok=True)
    env = dbt_env(settings.warehouse, work_dir)
    # cosmos runs dbt in a temporary copy of the project and reads target/ there afterwards
    env.pop("DBT_TARGET_PATH", None)
    env["FLEETLENS_DBT_THREADS"] = str(settings.airflow.dbt_threads)
    env["FLEETLENS_DBT_TARGET"] = TARGET_NAME
    variables: dict[str, Any] = {"raw_database": settings.warehouse.database}
    variables.update(window_vars(context.get("data_interval_start"), context.get("data_interval_end")))
    return env, variables


def use_configured_warehouse(context: Mapping[str, Any], operator: Any) -> None:
    """cosmos interceptor (runs in the task, before the dbt command is built): point dbt at the
    configured warehouse and pass the run's window. The password is registered with Airflow's
    secrets masker so it is redacted from task logs and rendered fields."""
    settings = load_settings()
    env, variables = dbt_runtime(settings, context)
    password = env.get("FLEETLENS_DBT_PASSWORD")
    if password:
        from airflow.sdk.log import mask_secret

        mask_secret(password)
    operator.env = {**(operator.env or {}), **env}
    operator.vars = {**(operator.vars or {}), **variables}
    log.info("dbt against %s, models in %s, vars %s", settings.warehouse.redacted(),
             env["FLEETLENS_DBT_SCHEMA"], dict(operator.vars))


def skip_unless_freshness_checked(context: Mapping[str, Any], operator: Any) -> None:
    """cosmos interceptor of the freshness task: skip it when the run's `check_freshness` param is
    false (a backfill of old windows, where "fresh" says nothing about the window's data)."""
    params = context.get("params") or {}
    if not params.get("check_freshness", True):
        from airflow.sdk.exceptions import AirflowSkipException

        raise AirflowSkipException("source freshness not checked: check_freshness is false for this run")
