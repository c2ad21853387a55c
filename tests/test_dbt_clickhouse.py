"""dbt-clickhouse against the embedded warehouse: a tiny project (seed, view, table, incremental,
generic + singular tests) is built twice, the second time after new and updated source rows."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path


PROJECT = Path(__file__).resolve().parent / "dbt_smoke_project"
DBT = Path(sys.executable).parent / "dbt"
SCHEMA = "dbt_smoke"
RAW_SCHEMA = "dbt_smoke_raw"  # must match models/sources.yml



def make_project(tmp_path: Path, port: int) -> tuple[Path, Path]:
    """Copy the project to tmp_path (target/ and logs/ stay out of the repo) and write its profile."""
    project = tmp_path / "project"
    shutil.copytree(PROJECT, project, ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"))
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    profile = (
        "fleetlens_dbt_smoke:\n"
        "  target: embedded\n"
        "  outputs:\n"
        "    embedded:\n"
        "      type: clickhouse\n"
        "      driver: http\n"
        "      host: 127.0.0.1\n"
        f"      port: {port}\n"
        "      user: default\n"
        "      password: ''\n"
        f"      schema: {SCHEMA}\n"
        "      threads: 1\n"
        "      connect_timeout: 10\n"
        "      send_receive_timeout: 120\n"
    )
    (profiles / "profiles.yml").write_text(profile)
    return project, profiles


def dbt(project: Path, profiles: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "DO_NOT_TRACK": "1",
        "DBT_LOG_PATH": str(project / "logs"),
        "DBT_TARGET_PATH": str(project / "target"),
    }
    return subprocess.run(
        [str(DBT), "--no-use-colors", *args, "--profiles-dir", str(profiles), "--project-dir", str(project)],
        cwd=project, env=env, capture_output=True, text=True, timeout=300,
    )


def explain(result: subprocess.CompletedProcess[str]) -> str:
    return f"dbt exited {result.returncode}\n--- stdout ---\n{result.stdout[-8000:]}\n--- stderr ---\n{result.stderr[-4000:]}"


def run_results(project: Path) -> tuple[str, dict[str, str]]:
    """(invocation_id, unique_id -> status) from the last invocation's run_results.json."""
    data = json.loads((project / "target" / "run_results.json").read_text())
    return data["metadata"]["invocation_id"], {r["unique_id"]: r["status"] for r in data["results"]}


def create_raw_trips(client) -> None:
    client.command(f"CREATE DATABASE IF NOT EXISTS {RAW_SCHEMA}")
    client.command(
        f"CREATE TABLE {RAW_SCHEMA}.trips (trip_id UInt32, vehicle_id UInt32, status String,"
        " distance_km Float64, updated_at DateTime) ENGINE = MergeTree ORDER BY (trip_id, updated_at)"
    )


def insert_trips(client, rows: list[tuple]) -> None:
    client.insert(
        f"{RAW_SCHEMA}.trips", rows,
        column_names=["trip_id", "vehicle_id", "status", "distance_km", "updated_at"],
    )


def ts(hour: int, minute: int = 0):
    from datetime import datetime

    return datetime(2025, 1, 1, hour, minute)


def test_dbt_build_twice_with_incremental_updates(start_warehouse, tmp_path: Path) -> None:
    wh = start_warehouse()
    client = wh.client()
    project, profiles = make_project(tmp_path, wh.port)

    create_raw_trips(client)
    insert_trips(client, [
        (101, 1, "PLANNED", 10.0, ts(8)),
        (102, 2, "active", 20.5, ts(8, 5)),
        (103, 3, "done", 7.25, ts(8, 10)),
    ])

    first = dbt(project, profiles, "build")
    assert first.returncode == 0, explain(first)
    first_id, statuses = run_results(project)
    assert all(s in ("success", "pass") for s in statuses.values()), statuses
    # seed + 3 models + 10 generic tests + 1 singular test
    assert sum(k.startswith("seed.") for k in statuses) == 1
    assert sum(k.startswith("model.") for k in statuses) == 3
    assert sum(k.startswith("test.") for k in statuses) == 11
    assert client.query(
        f"SELECT count(), uniqExact(loaded_by), any(loaded_by) FROM {SCHEMA}.trips_latest"
    ).result_rows == [(3, 1, first_id)]

    # New source rows: two updates of already-loaded trips (later updated_at), two new trips, and a
    # late re-emission of 103 that is *older* than the incremental watermark (must be ignored).
    insert_trips(client, [
        (101, 1, "active", 11.5, ts(9)),
        (102, 2, "done", 42.0, ts(9, 5)),
        (104, 4, "planned", 3.0, ts(9, 10)),
        (105, 1, "active", 8.0, ts(9, 15)),
        (103, 3, "planned", 999.0, ts(7)),
    ])

    second = dbt(project, profiles, "build")
    assert second.returncode == 0, explain(second)
    second_id, statuses = run_results(project)
    assert second_id != first_id
    assert all(s in ("success", "pass") for s in statuses.values()), statuses

    # table (from the seed)
    assert client.query(
        f"SELECT vehicle_id, name, fleet FROM {SCHEMA}.dim_vehicles ORDER BY vehicle_id"
    ).result_rows == [(1, "truck-01", "north"), (2, "truck-02", "north"), (3, "van-01", "south"), (4, "van-02", "south")]
    assert client.query(
        f"SELECT engine FROM system.tables WHERE database = '{SCHEMA}' AND name = 'dim_vehicles'"
    ).result_rows == [("MergeTree",)]

    # view: every raw row, status normalised
    assert client.query(
        f"SELECT engine FROM system.tables WHERE database = '{SCHEMA}' AND name = 'stg_trips'"
    ).result_rows == [("View",)]
    assert client.query(f"SELECT count(), countIf(status = 'planned') FROM {SCHEMA}.stg_trips").result_rows == [(8, 3)]

    # incremental: new trips appended, updated trips replaced by unique_key (not duplicated), and
    # the untouched trip 103 still carries the first run's invocation id (it was not rebuilt)
    assert client.query(
        f"SELECT count(), count(DISTINCT trip_id) FROM {SCHEMA}.trips_latest"
    ).result_rows == [(5, 5)]
    assert client.query(
        f"SELECT trip_id, vehicle_id, status, distance_km, updated_at, loaded_by"
        f" FROM {SCHEMA}.trips_latest ORDER BY trip_id"
    ).result_rows == [
        (101, 1, "active", 11.5, ts(9), second_id),
        (102, 2, "done", 42.0, ts(9, 5), second_id),
        (103, 3, "done", 7.25, ts(8, 10), first_id),
        (104, 4, "planned", 3.0, ts(9, 10), second_id),
        (105, 1, "active", 8.0, ts(9, 15), second_id),
    ]


def test_failing_generic_test_fails_the_build(start_warehouse, tmp_path: Path) -> None:
    wh = start_warehouse()
    project, profiles = make_project(tmp_path, wh.port)

    result = dbt(
        project, profiles, "build", "--select", "vehicles", "dim_vehicles",
        "--indirect-selection", "cautious", "--vars", "{inject_bad_row: true}",
    )
    assert result.returncode != 0, explain(result)
    _, statuses = run_results(project)
    assert statuses["seed.fleetlens_dbt_smoke.vehicles"] == "success", statuses
    assert statuses["model.fleetlens_dbt_smoke.dim_vehicles"] == "success", statuses
    unique = [k for k in statuses if k.startswith("test.fleetlens_dbt_smoke.unique_dim_vehicles_vehicle_id")]
    assert len(unique) == 1 and statuses[unique[0]] == "fail", statuses
    # only the injected duplicate fails; the other tests on the model still pass
    others = {k: s for k, s in statuses.items() if k.startswith("test.") and k not in unique}
    assert others and all(s == "pass" for s in others.values()), statuses
    assert wh.client().query(
        f"SELECT count(), count(DISTINCT vehicle_id) FROM {SCHEMA}.dim_vehicles"
    ).result_rows == [(5, 4)]
