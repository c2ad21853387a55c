"""fleetlens_nightly_evals: has quality drifted since last night? The eval suite through the running
gateway, one mapped task per target (`evals.targets`, default every feature of the gate policy's
`traffic:`), each compared with its previous complete run by the gate policy (fleetlens.evals.nightly).
A significant drop fails the task, which fires the failure alert; every decision is stored in
gate_decisions (the dashboards' Evals page). Re-running a night runs the suite again: a new run, compared
with the last complete one."""

from __future__ import annotations

from airflow.sdk import DAG, task
from fleetlens.config import load_settings
from fleetlens.dags._defaults import START_DATE, default_args

settings = load_settings()

with DAG(
    dag_id="fleetlens_nightly_evals",
    description="nightly eval suite through the gateway, compared with the previous night",
    schedule="0 2 * * *",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=default_args(settings),
    tags=["fleetlens", "evals"],
    doc_md=__doc__,
) as dag:

    @task
    def plan() -> list[dict]:
        """The targets and their tasks, read when the run starts (not when the file is parsed)."""
        from fleetlens.evals.nightly import nightly_plan

        return nightly_plan(load_settings())

    @task(map_index_template="{{ target }}")
    def run_evals(entry: dict) -> dict:
        """One target: run, compare with its previous run, store the decision; fail on a regression."""
        from airflow.sdk import get_current_context
        from fleetlens.evals.nightly import run_nightly
        from fleetlens.warehouse.client import connect

        get_current_context()["target"] = entry["target"]  # names the mapped task in the UI
        current = load_settings()
        return run_nightly(current, entry, client=connect(current.warehouse),
                           database=current.warehouse.database).as_dict()

    run_evals.expand(entry=plan())
