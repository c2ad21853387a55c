"""fleetlens_retention: drop the partitions past each table's retention and keep the table TTLs in
line with the settings (traces_ttl_days, metrics_ttl_days, retention.tables). Daily; idempotent.

One mapped task per table, so a table that cannot be expired fails alone and says why."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, task
from fleetlens.config import load_settings
from fleetlens.dags._defaults import START_DATE, default_args

settings = load_settings()

with DAG(
    dag_id="fleetlens_retention",
    description="drop expired partitions and set table TTLs from the retention settings",
    schedule="30 3 * * *",
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    default_args=default_args(settings),
    tags=["fleetlens", "retention"],
    doc_md=__doc__,
) as dag:

    @task
    def plan() -> list[dict]:
        """The configured rules, read when the run starts (not when the file is parsed)."""
        from fleetlens.retention import retention_rules

        return [rule.as_dict() for rule in retention_rules(load_settings())]

    @task(map_index_template="{{ table }}")
    def enforce(rule: dict, data_interval_end: datetime | None = None) -> dict:
        """Apply one rule; the cutoff counts from the run's interval end, so a re-run drops the same."""
        from airflow.sdk import get_current_context
        from fleetlens.retention import enforce_planned

        get_current_context()["table"] = f"{rule['database']}.{rule['table']}"  # names the mapped task in the UI
        return enforce_planned(rule, data_interval_end)

    enforce.expand(rule=plan())
