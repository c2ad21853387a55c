"""FleetLens' Airflow DAGs (dags/): they load, the hourly one builds the real dbt project against a real
embedded warehouse with dag.test(), a broken model fails the run and alerts, retention drops old
partitions only.

Airflow never runs in the pytest process: every Airflow step is a child process
(tests/airflow_driver.py) with AIRFLOW_HOME, LOAD_EXAMPLES and UNIT_TEST_MODE set in its environment
before Airflow is imported, so nothing of Airflow's configuration or logging leaks into other tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import REPO, WarehouseProcess, child_env, migrated_database
from fleetlens.config import Settings
from fleetlens.dbt_tasks import ensure_manifest, manifests_dir
from fleetlens.orchestration import DAGS_FOLDER, airflow_env, airflow_executable
from fleetlens.retention import RetentionError, RetentionRule, enforce
from fleetlens.transform import PROJECT_DIR
from test_dbt_project import one_request

DRIVER = Path(__file__).with_name("airflow_driver.py")
NOW = datetime.now(timezone.utc).replace(microsecond=0)
HOUR = NOW.replace(minute=0, second=0)  # logical date of the hourly run: its window is [HOUR - 1 h, HOUR)
EXPECTED_DAGS = {"fleetlens_hourly", "fleetlens_nightly_evals", "fleetlens_retention"}


MANIFESTS_CACHE = REPO / ".cache" / "dbt-manifests"


def share_dbt_manifests(data_dir: Path) -> None:
    """Point `data_dir`'s dbt manifest cache at one shared by the tests and across test runs: the
    manifests are keyed by the project's content, so a `dbt parse` (~6 s) is only paid after a change."""
    MANIFESTS_CACHE.mkdir(parents=True, exist_ok=True)
    (data_dir / "dbt").mkdir(parents=True, exist_ok=True)
    (data_dir / "dbt" / "manifests").symlink_to(MANIFESTS_CACHE)


@pytest.fixture(scope="module")
def airflow_base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An Airflow home with a migrated SQLite metadata DB, shared by this module's tests; returns the
    environment of an Airflow child process (FleetLens' own `airflow_env` plus test-only settings)."""
    data_dir = tmp_path_factory.mktemp("airflow") / "data"
    share_dbt_manifests(data_dir)
    env = child_env({
        **airflow_env(Settings(data_dir=data_dir)),
        "AIRFLOW__CORE__UNIT_TEST_MODE": "True",
        "FLEETLENS_AIRFLOW__RETRIES": "0",  # a failure is final at once (no 2 min retry delay)
    })
    # The dbt manifest the hourly DAG is drawn from, made once here (dbt parse) and reused by every parse.
    ensure_manifest(PROJECT_DIR, manifests_dir(Settings(data_dir=data_dir)))
    result = subprocess.run([airflow_executable(), "db", "migrate"], env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return env


def drive(env: dict[str, str], *args: str, timeout_s: float = 300) -> tuple[dict, str]:
    """Run tests/airflow_driver.py with `args`; returns its JSON result and its whole output (logs)."""
    result = subprocess.run([sys.executable, str(DRIVER), *args], env=env, capture_output=True, text=True,
                            timeout=timeout_s)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), output


def dbt_nodes(kind: str, *, materialized: bool = False) -> set[str]:
    """Names of the project's models or seeds as dbt sees them (its manifest: the project is still
    growing); with `materialized`, only those that leave a table or view behind (not ephemeral)."""
    manifest = json.loads(ensure_manifest(PROJECT_DIR, MANIFESTS_CACHE).read_text())
    return {node["name"] for node in manifest["nodes"].values() if node["resource_type"] == kind
            and not (materialized and node["config"].get("materialized") == "ephemeral")}


def test_dagbag_loads_the_three_dags_fast_and_without_errors(airflow_base):
    bag, output = drive(airflow_base, "dagbag", str(DAGS_FOLDER))
    assert bag["import_errors"] == {}, bag["import_errors"]
    assert set(bag["dags"]) == EXPECTED_DAGS
    hourly = set(bag["dags"]["fleetlens_hourly"])
    assert "source_freshness" in hourly
    assert {f"dbt_build.{m}_model_build" for m in dbt_nodes("model", materialized=True)} <= hourly
    assert {f"dbt_build.{s}_seed_build" for s in dbt_nodes("seed")} <= hourly
    assert bag["dags"]["fleetlens_nightly_evals"] == ["plan", "run_evals"]
    assert bag["dags"]["fleetlens_retention"] == ["enforce", "plan"]
    assert bag["schedules"]["fleetlens_hourly"] == "CronDataIntervalTimetable"  # a one-hour data interval
    assert not any(bag["catchup"].values())
    # no dbt at parse time: the manifest is cached; the whole folder parses well under a few seconds
    assert "dbt parse" not in output
    assert bag["file_seconds"]["fleetlens_hourly.py"] < 2.0, bag["file_seconds"]
    assert sum(bag["file_seconds"].values()) < 3.0, bag["file_seconds"]
    print(f"DAG parse times: {bag['file_seconds']}")


@pytest.fixture(scope="module")
def spans_warehouse(warehouse: WarehouseProcess) -> tuple[str, object]:
    """Database `af_hourly`: one gateway request (5 spans) and a metrics sample inside the hourly
    window [HOUR - 1 h, HOUR), fresh enough for `dbt source freshness`."""
    url = migrated_database(warehouse, "af_hourly")
    client = warehouse.client()
    client.command("DROP DATABASE IF EXISTS af_hourly_marts")
    rows = one_request(HOUR - timedelta(minutes=30))
    columns = list(rows[0])
    client.insert("af_hourly.otel_traces", [[row[c] for c in columns] for row in rows], column_names=columns)
    client.insert("af_hourly.fleet_metrics",
                  [[HOUR - timedelta(minutes=20), "llama-8b-0", "llama-8b", "vllm:num_requests_running", "gauge", {}, 2.0]],
                  column_names=["ts", "replica", "model", "metric", "metric_type", "labels", "value"])
    return url, client


@pytest.mark.slow
def test_hourly_dag_builds_the_dbt_project_for_its_window(airflow_base, spans_warehouse):
    url, client = spans_warehouse
    run, output = drive({**airflow_base, "FLEETLENS_WAREHOUSE_URL": url},
                        "test", str(DAGS_FOLDER), "fleetlens_hourly", HOUR.isoformat())
    failed = {task: state for task, state in run["tasks"].items() if state != "success"}
    assert run["state"] == "success" and not failed, (failed, output[-6000:])
    assert run["data_interval"] == [(HOUR - timedelta(hours=1)).isoformat(), HOUR.isoformat()]
    # every task got the run's window as dbt vars, and the raw database from the warehouse URL
    window = (f"'raw_database': 'af_hourly', 'window_start': '{(HOUR - timedelta(hours=1)).isoformat()}', "
              f"'window_end': '{HOUR.isoformat()}'")
    assert window in output
    built = {name for (name,) in client.query("SELECT name FROM system.tables WHERE database = 'af_hourly_marts'")
             .result_rows}
    assert dbt_nodes("model", materialized=True) | dbt_nodes("seed") <= built, sorted(built)
    assert client.query("SELECT count() FROM af_hourly_marts.stg_otel__spans").result_rows[0][0] == 5
    print(f"hourly dag.test: {run['seconds']:.1f} s for {len(run['tasks'])} tasks")


class WebhookReceiver:
    """A local HTTP endpoint standing in for a chat webhook: records every POSTed JSON body."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                receiver.bodies.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/alerts?token=s3cr3t-hook-token"

    def __enter__(self) -> "WebhookReceiver":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def broken_project(tmp_path: Path) -> Path:
    """A copy of dbt_project/ with one more model whose SQL the warehouse rejects."""
    copy = tmp_path / "dbt_project"
    shutil.copytree(PROJECT_DIR, copy, ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"))
    (copy / "models" / "broken_model.sql").write_text("select this is not sql from nowhere at all\n")
    return copy


def test_broken_model_fails_the_run_and_alerts(airflow_base, start_warehouse, broken_project):
    # a warehouse with a password: it must appear in no log line, rendered field or alert
    password = "pw-" + "9f3c1e7a5b"
    secured = start_warehouse(password=password)
    url = migrated_database(secured, "af_broken").replace("default@", f"default:{password}@")
    with WebhookReceiver() as webhook:
        env = {**airflow_base, "FLEETLENS_WAREHOUSE_URL": url, "FLEETLENS_AIRFLOW__DBT_PROJECT_DIR": str(broken_project),
               "FLEETLENS_AIRFLOW__ALERT_WEBHOOK_URL": webhook.url}
        # Only the broken model runs; the other nodes are marked successful (the full build is the test
        # above). check_freshness false: the freshness task is skipped, the build group still runs.
        run, output = drive(env, "test", str(DAGS_FOLDER), "fleetlens_hourly", HOUR.isoformat(),
                            json.dumps({"check_freshness": False}), r"dbt_build\.(?!broken_model).*")
    task = "dbt_build.broken_model_model_build"
    assert run["state"] == "failed"
    assert run["tasks"][task] == "failed" and run["tasks"]["source_freshness"] == "skipped", run["tasks"]
    assert f"FleetLens task failed: dag=fleetlens_hourly task={task}" in output  # the log line
    assert len(webhook.bodies) == 1, webhook.bodies
    alert = webhook.bodies[0]
    assert {k: alert[k] for k in ("dag_id", "task_id", "try_number")} == {
        "dag_id": "fleetlens_hourly", "task_id": task, "try_number": 1}
    assert alert["run_id"].startswith("manual__") and alert["logical_date"].startswith(HOUR.date().isoformat())
    assert "broken_model" in alert["error"] and "Syntax error" in alert["error"], alert["error"]  # not an auth error
    assert "s3cr3t-hook-token" not in output  # the webhook URL (its token) is never logged
    assert password not in output and password not in json.dumps(alert)


def _insert_at(client, database: str, moments: list[datetime]) -> None:
    rows = [row for i, at in enumerate(moments) for row in one_request(at, trace=f"{i + 1:032x}")]
    columns = list(rows[0])
    client.insert(f"{database}.otel_traces", [[row[c] for c in columns] for row in rows], column_names=columns)
    client.insert(f"{database}.fleet_metrics", [[at, "r0", "m", "up", "gauge", {}, 1.0] for at in moments],
                  column_names=["ts", "replica", "model", "metric", "metric_type", "labels", "value"])


def _days(client, table: str, column: str) -> set[str]:
    return {str(day) for (day,) in client.query(f"SELECT DISTINCT toDate({column}) FROM {table}").result_rows}


def _engine(client, database: str, table: str) -> str:
    return client.query("SELECT engine_full FROM system.tables WHERE database = %(d)s AND name = %(t)s",
                        parameters={"d": database, "t": table}).result_rows[0][0]


def test_retention_dag_drops_expired_partitions_only(airflow_base, warehouse):
    url = migrated_database(warehouse, "af_retention")
    client = warehouse.client()
    old, recent = NOW - timedelta(days=40), NOW - timedelta(days=1)
    _insert_at(client, "af_retention", [old, recent, NOW])
    # a dbt-model-like table in the models database, partitioned by day, configured in retention.tables
    client.command("DROP DATABASE IF EXISTS af_retention_marts")
    client.command("CREATE DATABASE af_retention_marts")
    client.command("CREATE TABLE af_retention_marts.daily_usage (day Date, usd Float64) ENGINE = MergeTree"
                   " PARTITION BY toYYYYMM(day) ORDER BY day SETTINGS ttl_only_drop_parts = 1")
    client.command("INSERT INTO af_retention_marts.daily_usage VALUES (today() - 200, 1), (today() - 1, 2)")
    env = {**airflow_base, "FLEETLENS_WAREHOUSE_URL": url, "FLEETLENS_TRACES_TTL_DAYS": "30",
           "FLEETLENS_RETENTION__TABLES": json.dumps({"daily_usage": {"days": 90, "time_column": "day"}})}

    run, output = drive(env, "test", str(DAGS_FOLDER), "fleetlens_retention", NOW.isoformat())

    assert run["state"] == "success", output[-6000:]
    assert len([t for t in run["tasks"] if t.startswith("enforce[")]) == 4  # 3 collector tables + daily_usage
    assert _days(client, "af_retention.otel_traces", "Timestamp") == {str(recent.date()), str(NOW.date())}
    assert "TTL toDateTime(Timestamp) + toIntervalDay(30)" in _engine(client, "af_retention", "otel_traces")
    assert "TTL toDateTime(Start) + toIntervalDay(30)" in _engine(client, "af_retention", "otel_traces_trace_id_ts")
    # metrics_ttl_days = 0 keeps everything, and no TTL
    assert len(_days(client, "af_retention.fleet_metrics", "ts")) == 3
    assert " TTL " not in _engine(client, "af_retention", "fleet_metrics")
    usage = client.query("SELECT day FROM af_retention_marts.daily_usage").result_rows
    assert len(usage) == 1 and (NOW.date() - usage[0][0]).days <= 2
    assert "TTL toDateTime(day) + toIntervalDay(90)" in _engine(client, "af_retention_marts", "daily_usage")

    # idempotent: the same rules again drop nothing and leave the TTL as it is
    again = enforce(client, RetentionRule("af_retention", "otel_traces", "Timestamp", 30), NOW)
    assert again.dropped_partitions == [] and again.ttl_action == "unchanged"
    # 0 days removes the TTL the previous run set
    assert enforce(client, RetentionRule("af_retention", "otel_traces", "Timestamp", 0), NOW).ttl_action == "removed"


def test_retention_refuses_a_table_not_partitioned_by_its_time_column(warehouse):
    client = warehouse.client()
    client.command("CREATE DATABASE IF NOT EXISTS af_retention_bad")
    client.command("CREATE OR REPLACE TABLE af_retention_bad.t (at DateTime, kind String) ENGINE = MergeTree"
                   " PARTITION BY kind ORDER BY at")
    client.command("INSERT INTO af_retention_bad.t VALUES (now() - toIntervalDay(400), 'a')")
    with pytest.raises(RetentionError, match="partitioned by 'kind', not by at"):
        enforce(client, RetentionRule("af_retention_bad", "t", "at", 30), NOW)
    assert client.query("SELECT count() FROM af_retention_bad.t").result_rows[0][0] == 1
    missing = enforce(client, RetentionRule("af_retention_bad", "not_built_yet", "at", 30), NOW)
    assert missing.ttl_action == "table missing"


# --- settings and helpers the DAGs rely on (no Airflow needed) ---------------------------------------------


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for key in list(__import__("os").environ):
        if key.startswith("FLEETLENS_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_airflow_settings_are_secure_and_small_by_default(clean_env, tmp_path):
    from fleetlens.config import load_settings

    settings = load_settings()
    env = airflow_env(settings)
    assert env["AIRFLOW_HOME"] == str(tmp_path / ".fleetlens" / "airflow")
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] == f"sqlite:///{tmp_path / '.fleetlens' / 'airflow' / 'airflow.db'}"
    assert env["AIRFLOW__API__HOST"] == "127.0.0.1" and env["AIRFLOW__API__PORT"] == "8081"
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:8081/execution/"
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False" and env["AIRFLOW__CORE__PARALLELISM"] == "2"
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(REPO / "dags")
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    clean_env.setenv("FLEETLENS_AIRFLOW__DATABASE_URL", "postgresql+psycopg2://airflow:pw-x@db:5432/airflow")
    assert airflow_env(load_settings())["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@db:5432/airflow")


def test_retention_settings_resolve_databases_and_refuse_conflicts(clean_env):
    from fleetlens.config import ConfigError, load_settings
    from fleetlens.retention import retention_rules

    clean_env.setenv("FLEETLENS_WAREHOUSE_URL", "http://default@127.0.0.1:8123/fleet")
    clean_env.setenv("FLEETLENS_TRACES_TTL_DAYS", "14")
    clean_env.setenv("FLEETLENS_RETENTION__TABLES", json.dumps({
        "stg_otel__spans": {"days": 90, "time_column": "started_at"},
        "eval_items": {"days": 365, "time_column": "ts", "database": "raw"}}))
    rules = {(r.database, r.table): (r.time_column, r.days) for r in retention_rules(load_settings())}
    assert rules == {("fleet", "otel_traces"): ("Timestamp", 14), ("fleet", "otel_traces_trace_id_ts"): ("Start", 14),
                     ("fleet", "fleet_metrics"): ("ts", 0), ("fleet_marts", "stg_otel__spans"): ("started_at", 90),
                     ("fleet", "eval_items"): ("ts", 365)}
    clean_env.setenv("FLEETLENS_RETENTION__TABLES", '{"otel_traces": {"days": 1, "time_column": "Timestamp", "database": "raw"}}')
    with pytest.raises(ConfigError, match="set its retention with `traces_ttl_days`"):
        load_settings()
    clean_env.setenv("FLEETLENS_RETENTION__TABLES", '{"t": {"days": 1, "time_column": "x; DROP TABLE y"}}')
    with pytest.raises(ConfigError, match="plain identifier"):
        load_settings()


def test_dbt_profile_variables_are_not_unknown_settings(clean_env):
    """A dbt task running in-process leaves FLEETLENS_DBT_* (the profile's variables) in its environment;
    the failure callback still has to read the settings."""
    from fleetlens.config import load_settings

    clean_env.setenv("FLEETLENS_DBT_PASSWORD", "x")
    clean_env.setenv("FLEETLENS_DBT_HOST", "127.0.0.1")
    assert load_settings().warehouse.host == "127.0.0.1"


def test_failure_alert_never_raises_and_scrubs_secrets():
    from fleetlens.alerts import failure_payload, send_alert

    class TaskInstance:
        dag_id, task_id, run_id, try_number = "d", "t", "manual__1", 2

    payload = failure_payload({"ti": TaskInstance(), "logical_date": NOW,
                               "exception": RuntimeError("auth failed for default:hunter2@db")}, ["hunter2"])
    assert payload == {"dag_id": "d", "task_id": "t", "run_id": "manual__1", "logical_date": NOW.isoformat(),
                       "try_number": 2, "error": "RuntimeError: auth failed for default:***@db"}
    assert send_alert(payload, "http://127.0.0.1:9/unreachable", timeout_s=1.0) is False  # logged, not raised


NIGHTLY_POLICY = """# the shipped rule with a floor the test's 20 items meet
min_items: 10
bootstrap_resamples: 2000
traffic:
  lookup: [lookup_hard]
"""


def _nightly_runs(client, database: str) -> list[tuple[str, str]]:
    return client.query(f"SELECT run_id, status FROM {database}.eval_runs FINAL ORDER BY started_at").result_rows


@pytest.mark.slow
def test_nightly_evals_compare_each_target_with_its_previous_run_and_alert_on_a_drop(
        airflow_base, warehouse, stub_gateway, tmp_path: Path):
    base, key, _stub = stub_gateway  # the real gateway before the stub upstream (it echoes: every answer is wrong)
    url = migrated_database(warehouse, "af_nightly")
    client = warehouse.client()
    (tmp_path / "eval.key").write_text(key + "\n")
    (tmp_path / "gate.yaml").write_text(NIGHTLY_POLICY)
    env = {**airflow_base, "FLEETLENS_WAREHOUSE_URL": url, "FLEETLENS_EVALS__GATEWAY_URL": base,
           "FLEETLENS_EVALS__API_KEY_FILE": str(tmp_path / "eval.key"),
           "FLEETLENS_EVALS__POLICY_FILE": str(tmp_path / "gate.yaml"), "FLEETLENS_EVALS__LIMIT": "20"}

    # night 1: nothing to compare with; night 2: the same answers -> pass, decision stored
    for night in (1, 2):
        run, output = drive(env, "test", str(DAGS_FOLDER), "fleetlens_nightly_evals", NOW.isoformat())
        assert run["state"] == "success", output[-6000:]
        assert run["tasks"] == {"plan": "success", "run_evals[0]": "success"}
    (first, _), (second, _) = _nightly_runs(client, "af_nightly")
    decisions = client.query("SELECT verdict, baseline_ref, candidate_ref FROM af_nightly.gate_decisions").result_rows
    assert decisions == [("pass", f"nightly {first}", f"nightly {second}")]

    # a previous night that answered every item right: tonight's 0% is a significant drop -> fail + alert
    (config_hash, target, route), = client.query(
        "SELECT config_hash, target, route FROM af_nightly.eval_runs FINAL WHERE run_id = {r:String}",
        parameters={"r": second}).result_rows
    items = client.query("SELECT task, item_id, slice FROM af_nightly.eval_items FINAL WHERE run_id = {r:String}",
                         parameters={"r": second}).result_rows
    moment = datetime.now(timezone.utc)
    client.insert("af_nightly.eval_runs", [["good-night", moment, moment, target, "demo-large", "", route,
                                            "lookup_hard", "complete", len(items), {"exact_match": 1.0}, config_hash,
                                            "", 0, {}, moment]],
                  column_names=["run_id", "started_at", "finished_at", "target", "model", "variant", "route", "task",
                                "status", "n_items", "metrics", "config_hash", "git_sha", "seed", "params",
                                "updated_at"])
    client.insert("af_nightly.eval_items", [["good-night", task, item, moment, slice_, 1.0, 1, 10.0, 4, 4, ""]
                                            for task, item, slice_ in items],
                  column_names=["run_id", "task", "item_id", "ts", "slice", "score", "correct", "latency_ms",
                                "input_tokens", "output_tokens", "trace_id"])
    with WebhookReceiver() as webhook:
        run, output = drive({**env, "FLEETLENS_AIRFLOW__ALERT_WEBHOOK_URL": webhook.url},
                            "test", str(DAGS_FOLDER), "fleetlens_nightly_evals", NOW.isoformat())
    assert run["state"] == "failed" and run["tasks"]["run_evals[0]"] == "failed", run
    assert len(webhook.bodies) == 1 and webhook.bodies[0]["task_id"] == "run_evals"
    assert "quality dropped since run good-night" in webhook.bodies[0]["error"]
    verdicts = client.query("SELECT verdict, baseline_ref FROM af_nightly.gate_decisions ORDER BY decided_at").result_rows
    assert verdicts[-1] == ("fail", "nightly good-night")
