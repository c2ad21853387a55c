"""fleetlens_hourly: check that spans still arrive, then build and test the dbt models for the hour.

The dbt project renders as one Airflow task per model and seed (astronomer-cosmos; each runs
`dbt build --select <node>`, i.e. the model and its tests), ordered by dbt's own graph: cosmos
reads a cached manifest.json (see fleetlens.dbt_tasks), so parsing this file does not run dbt.
Each run passes its data interval as the dbt vars `window_start` / `window_end`: the incremental
models rebuild the days it touches, so a re-run or a backfill of any hour is idempotent.

Backfill (Airflow 3, the scheduler runs it):
    fleetlens airflow backfill create --dag-id fleetlens_hourly --from-date 2025-06-01 --to-date 2025-06-02 \
        --dag-run-conf '{"check_freshness": false}'
"""

from __future__ import annotations

from cosmos import DbtTaskGroup, ExecutionConfig, ProfileConfig, ProjectConfig, RenderConfig
from cosmos.constants import InvocationMode, LoadMode, TestBehavior
from cosmos.operators.local import DbtSourceLocalOperator

from airflow.sdk import DAG, CronDataIntervalTimetable, Param
from fleetlens.config import load_settings
from fleetlens.dags._defaults import START_DATE, default_args
from fleetlens.dbt_tasks import PROFILE_NAME, TARGET_NAME, dbt_project_dir, ensure_manifest, manifests_dir, \
    partial_parse_cache, skip_unless_freshness_checked, use_configured_warehouse
from fleetlens.transform import dbt_executable

settings = load_settings()
project_dir = dbt_project_dir(settings)
manifest = ensure_manifest(project_dir, manifests_dir(settings))
profile = ProfileConfig(profile_name=PROFILE_NAME, target_name=TARGET_NAME,
                        profiles_yml_filepath=project_dir / "profiles.yml")
execution = ExecutionConfig(invocation_mode=InvocationMode.DBT_RUNNER, dbt_executable_path=dbt_executable())

with DAG(
    dag_id="fleetlens_hourly",
    description="dbt source freshness, then dbt build (models + tests) of the hour's window",
    # A data interval of one hour (a plain "@hourly" is a trigger with start == end in Airflow 3).
    schedule=CronDataIntervalTimetable("0 * * * *", timezone="UTC"),
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,  # hourly windows of the same days overlap: one build at a time
    default_args=default_args(settings),
    params={"check_freshness": Param(True, type="boolean",
                                     description="Fail the run when spans stopped arriving (off for old backfills).")},
    tags=["fleetlens", "dbt"],
    doc_md=__doc__,
) as dag:
    build = DbtTaskGroup(
        group_id="dbt_build",
        project_config=ProjectConfig(project_dir, manifest_path=manifest, project_name="fleetlens"),
        profile_config=profile,
        execution_config=execution,
        # a test over several models (a reconciliation) runs as its own task once all of them are built
        render_config=RenderConfig(load_method=LoadMode.DBT_MANIFEST, test_behavior=TestBehavior.BUILD,
                                   should_detach_multiple_parents_tests=True),
        # none_failed: a skipped freshness check (check_freshness false) still lets the build run
        operator_args={"interceptors": [use_configured_warehouse], "trigger_rule": "none_failed",
                       "install_deps": False, "emit_datasets": False},
    )
    freshness = DbtSourceLocalOperator(
        task_id="source_freshness",
        project_dir=str(project_dir),
        profile_config=profile,
        invocation_mode=InvocationMode.DBT_RUNNER,
        dbt_executable_path=dbt_executable(),
        cache_dir=partial_parse_cache(build),  # its full parse seeds the build tasks' partial parses
        interceptors=[skip_unless_freshness_checked, use_configured_warehouse],
        emit_datasets=False,
    )
    freshness >> build
