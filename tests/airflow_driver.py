"""Runs Airflow work for the tests in a child process, so importing Airflow (its configuration, its
logging set-up, its metadata DB engine) never happens in the pytest process and cannot leak into other
test modules. The parent passes AIRFLOW_HOME & co. in the environment; the last line printed is JSON.

    python tests/airflow_driver.py dagbag DAGS_FOLDER
    python tests/airflow_driver.py test DAGS_FOLDER DAG_ID LOGICAL_DATE [RUN_CONF_JSON [MARK_SUCCESS_REGEX]]
"""

from __future__ import annotations

import json
import sys
import time


def dagbag(folder: str) -> dict[str, object]:
    from airflow.dag_processing.dagbag import DagBag

    started = time.perf_counter()
    bag = DagBag(dag_folder=folder)
    return {
        "seconds": time.perf_counter() - started,
        "import_errors": {path: str(error) for path, error in bag.import_errors.items()},
        "dags": {dag_id: sorted(dag.task_dict) for dag_id, dag in bag.dags.items()},
        "file_seconds": {stat.file: stat.duration.total_seconds() for stat in bag.dagbag_stats},
        "schedules": {dag_id: type(dag.timetable).__name__ for dag_id, dag in bag.dags.items()},
        "catchup": {dag_id: dag.catchup for dag_id, dag in bag.dags.items()},
    }


def run_dag_test(folder: str, dag_id: str, logical_date: str, run_conf: str | None = None,
             mark_success: str | None = None) -> dict[str, object]:
    import pendulum
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=folder)
    assert not bag.import_errors, bag.import_errors
    dag = bag.dags[dag_id]
    started = time.perf_counter()
    run = dag.test(logical_date=pendulum.parse(logical_date), run_conf=json.loads(run_conf) if run_conf else None,
                   mark_success_pattern=mark_success or None)
    return {
        "seconds": time.perf_counter() - started,
        "state": str(run.state),
        "data_interval": [run.data_interval_start.isoformat(), run.data_interval_end.isoformat()],
        "tasks": {f"{ti.task_id}[{ti.map_index}]" if ti.map_index >= 0 else ti.task_id: str(ti.state)
                  for ti in run.get_task_instances()},
    }


def main(argv: list[str]) -> None:
    command, folder, *rest = argv
    result = dagbag(folder) if command == "dagbag" else run_dag_test(folder, *rest)
    sys.stdout.flush()
    print("\n" + json.dumps(result, default=str))


if __name__ == "__main__":
    main(sys.argv[1:])
