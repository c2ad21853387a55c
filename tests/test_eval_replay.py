"""Production replay (`fleetlens.evals.replay`, `fleetlens eval replay`): a task built from recorded traffic.

Real processes: two `fleetlens gateway`s (one with `gateway.record_content` on, one with it off) in front
of the repo's stub upstream, tracing through a real `fleetlens collector` into the embedded warehouse.
Requests of feature `support` go through the recording gateway; the builder reads them back from
`otel_traces` and writes `replay_support.{jsonl,yaml}`: ids are the trace ids, prompts and answers what
was sent and answered (redacted), failed requests and requests it cannot replay (a multi-message chat)
left out, repeated prompts kept once. A feature whose traffic went through the non-recording gateway
is a clear error (exit 1 from the CLI), as is a feature with no traffic. The written task runs:
`run_eval` of it through the gateway against the same (deterministic) upstream matches production on
every item.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import (
    CollectorProcess,
    FleetlensProcesses,
    WarehouseProcess,
    child_env,
    migrated_database,
    stub_models_yaml,
    wait_for,
)
from fleetlens import semconv as sc
from fleetlens.evals.replay import ReplayError, build_replay, task_name
from fleetlens.evals.runner import run_eval
from fleetlens.evals.suite import EvalConfigError, Suite
from fleetlens.net import free_port, wait_http
from fleetlens.serving.keys import generate_key

DATABASE = "eval_replay"
FEATURE = "support"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, warehouse: WarehouseProcess):
    """Traffic through a recording and a non-recording gateway, in the warehouse; yields what was sent."""
    from fleetlens.serving.stub_upstream import StubConfig, StubServer

    tmp = tmp_path_factory.mktemp("eval-replay")
    url = migrated_database(warehouse, DATABASE)
    collector = CollectorProcess(url, tmp / "collector").start()
    stub = StubServer(StubConfig(model="demo-large-served", completion_tokens=3)).start()
    (tmp / "models.yaml").write_text(stub_models_yaml(**{"demo-large": [stub.url]}))
    (tmp / "routes.yaml").write_text("default: chat\nfeatures:\n  chat:\n    model: demo-large\n    timeout_s: 10\n")
    key, digest = generate_key()
    (tmp / "keys.yaml").write_text(f"- {{id: k1, customer: acme, hash: '{digest}', feature: chat}}\n")
    bases: dict[str, str] = {}
    stacks = []
    try:
        for name, record in (("on", "true"), ("off", "false")):
            (tmp / name).mkdir()
            env = child_env({"FLEETLENS_DATA_DIR": str(tmp / name), "FLEETLENS_GATEWAY__RECORD_CONTENT": record,
                             "FLEETLENS_GATEWAY__OTLP_ENDPOINT": collector.endpoint})
            stack = FleetlensProcesses(tmp / name, env)
            stacks.append(stack)
            port = free_port()
            gateway = stack.spawn("gateway", "gateway", "--port", str(port), "--models", str(tmp / "models.yaml"),
                                  "--routes", str(tmp / "routes.yaml"), "--keys", str(tmp / "keys.yaml"))
            bases[name] = f"http://127.0.0.1:{port}"
            assert wait_http(bases[name] + "/health", 30, alive=lambda: gateway.poll() is None), \
                (tmp / name / "gateway.log").read_text()

        def send(gateway: str, feature: str, path: str, body: dict, status: int = 200) -> str:
            trace_id = secrets.token_hex(16)
            reply = httpx.post(bases[gateway] + path, timeout=30, json={"model": "auto", **body}, headers={
                "authorization": f"Bearer {key}", "x-fleetlens-feature": feature,
                "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01"})
            assert reply.status_code == status, reply.text
            return trace_id

        sent = {
            "first": send("on", FEATURE, "/v1/completions", {"prompt": "alpha beta gamma delta", "max_tokens": 16}),
            "email": send("on", FEATURE, "/v1/completions", {"prompt": "mail ada@example.com about it"}),
            "chat": send("on", FEATURE, "/v1/chat/completions",
                         {"messages": [{"role": "user", "content": "one two three four"}]}),
            "multi": send("on", FEATURE, "/v1/chat/completions", {"messages": [
                {"role": "system", "content": "be brief"}, {"role": "user", "content": "five six"}]}),
            "again": send("on", FEATURE, "/v1/completions", {"prompt": "alpha beta gamma delta", "max_tokens": 16}),
        }
        httpx.post(stub.url + "/admin/behaviour", json={"status": 500, "count": 1}).raise_for_status()
        sent["failed"] = send("on", FEATURE, "/v1/completions", {"prompt": "zeta eta theta"}, status=502)
        sent["other"] = send("on", "billing", "/v1/completions", {"prompt": "not this feature"})
        sent["quiet"] = [send("off", "quiet", "/v1/completions", {"prompt": f"unrecorded {n}"}) for n in range(2)]
        client = warehouse.client()
        everything = [t for v in sent.values() for t in (v if isinstance(v, list) else [v])]

        def landed() -> int:
            return client.query(
                f"SELECT count() FROM {DATABASE}.otel_traces WHERE ServiceName = {{s:String}} AND SpanKind = 'Server' "
                "AND TraceId IN {t:Array(String)}", parameters={"s": sc.GATEWAY_SERVICE, "t": everything}
            ).result_rows[0][0] == len(everything)

        wait_for(landed, timeout_s=60, interval_s=0.5)
        # the failed attempt's CLIENT span too (it may end after the root)
        wait_for(lambda: client.query(
            f"SELECT count() FROM {DATABASE}.otel_traces WHERE SpanKind = 'Client' AND TraceId IN {{t:Array(String)}}",
            parameters={"t": everything}).result_rows[0][0] == len(everything), timeout_s=30, interval_s=0.5)
        yield {"client": client, "url": url, "sent": sent, "base": bases["on"], "key": key, "tmp": tmp}
    finally:
        for stack in reversed(stacks):
            stack.stop()
        stub.stop()
        collector.stop()


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_replay_task_holds_the_recorded_requests(recorded, tmp_path: Path) -> None:
    sent = recorded["sent"]
    result = build_replay(recorded["client"], FEATURE, out_dir=tmp_path, database=DATABASE)
    assert result.task == task_name(FEATURE) == "replay_support"
    assert (result.requests, result.with_content) == (5, 5)  # the failed request is not a production answer
    assert result.skipped == {"chat with more than one message": 1,
                              "repeated prompt (the most recent answer is kept)": 1}
    assert result.data_path == tmp_path / "data" / "replay_support.jsonl"
    assert result.task_path == tmp_path / "tasks" / "replay_support.yaml"

    items = _lines(result.data_path)
    # oldest first; the repeated prompt keeps its most recent request
    assert [i["id"] for i in items] == [sent["email"], sent["chat"], sent["again"]]
    assert [(i["prompt"], i["answer"], i["kind"], i["finish_reason"]) for i in items] == [
        ("mail [EMAIL] about it", "mail [EMAIL] about", "completion", "stop"),  # redacted as recorded
        ("one two three four", "one two three", "chat", "stop"),
        ("alpha beta gamma delta", "alpha beta gamma", "completion", "stop")]
    assert {i["slice"] for i in items} == {FEATURE} and {i["model"] for i in items} == {"demo-large"}
    assert {i["output_tokens"] for i in items} == {3}

    config = yaml.safe_load(result.task_path.read_text())
    assert config["task"] == "replay_support" and config["output_type"] == "generate_until"
    assert config["dataset_kwargs"]["data_files"] == {"test": "replay_support.jsonl"}
    assert (config["doc_to_text"], config["doc_to_target"]) == ("prompt", "answer")
    assert config["generation_kwargs"]["max_gen_toks"] == 3 and config["generation_kwargs"]["until"] == []
    assert config["metric_list"][0]["metric"] == "exact_match"
    assert result.task_path.read_text().startswith("# Production replay of feature `support`: 3 recorded requests")
    (spec,) = Suite(tmp_path / "tasks", tmp_path / "data").resolve(["replay_support"])
    assert spec.count_items() == 3

    # without dedupe the repeated prompt is there twice; `limit` keeps the most recent items
    every = build_replay(recorded["client"], FEATURE, out_dir=tmp_path, database=DATABASE, dedupe=False,
                         name="replay_support_all")
    assert [i["id"] for i in _lines(every.data_path)] == [
        sent["first"], sent["email"], sent["chat"], sent["again"]]
    recent = build_replay(recorded["client"], FEATURE, out_dir=tmp_path, database=DATABASE, limit=2, name="recent")
    assert [i["id"] for i in recent.items] == [sent["chat"], sent["again"]]


def test_replay_without_recorded_content_or_traffic_is_a_clear_error(recorded, tmp_path: Path) -> None:
    client = recorded["client"]
    with pytest.raises(ReplayError, match=r"feature 'quiet' has 2 answered requests .* no recorded content.*"
                                          r"gateway\.record_content"):
        build_replay(client, "quiet", out_dir=tmp_path, database=DATABASE)
    with pytest.raises(ReplayError, match="no answered requests of feature 'nowhere'"):
        build_replay(client, "nowhere", out_dir=tmp_path, database=DATABASE)
    with pytest.raises(EvalConfigError, match="limit must be at least 1"):
        build_replay(client, FEATURE, out_dir=tmp_path, database=DATABASE, limit=0)
    assert not (tmp_path / "data").exists() and not (tmp_path / "tasks").exists()  # nothing half-written


def _cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetlens", "eval", *args], capture_output=True, text=True,
                          env=child_env({"COLUMNS": "200", "FLEETLENS_WAREHOUSE_URL": url}), timeout=120)


def test_cli_builds_the_task_and_the_runner_replays_it(recorded, tmp_path: Path) -> None:
    out = tmp_path / "replays"
    built = _cli("replay", "--feature", FEATURE, "--hours", "1", "--out-dir", str(out), url=recorded["url"])
    assert built.returncode == 0, built.stdout + built.stderr
    assert "replay_support: 3 items from 5 answered requests" in built.stdout
    assert (out / "data" / "replay_support.jsonl").is_file() and (out / "tasks" / "replay_support.yaml").is_file()

    quiet = _cli("replay", "--feature", "quiet", "--out-dir", str(out), url=recorded["url"])
    assert quiet.returncode == 1 and "record_content" in " ".join(quiet.stderr.split()), quiet.stderr

    listed = _cli("tasks", "--tasks-dir", str(out / "tasks"), "--data-dir", str(out / "data"), url=recorded["url"])
    assert listed.returncode == 0 and "replay_support" in listed.stdout and "Production replay" in listed.stdout

    # the same deterministic upstream, asked again through the gateway, answers as production did
    result = run_eval("demo-large", recorded["base"], recorded["key"], ["replay_support"],
                      suite=Suite(out / "tasks", out / "data"))
    task = result.tasks["replay_support"]
    assert result.status == "complete" and task.n_items == 3 and task.accuracy == 1.0, \
        [(i.item_id, i.response, i.target) for i in task.items]
    sent = recorded["sent"]
    assert [i.item_id for i in task.items] == [sent["email"], sent["chat"], sent["again"]]
    assert {i.slice for i in task.items} == {FEATURE}
