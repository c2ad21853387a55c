"""The gateway's retrieval stage, fallback_on triggers, response_format checks, tokenizer passthrough,
record_content with redaction, /metrics and keys.yaml reload — in-process, with the stub upstream
(serving/stub_upstream.py) behind httpx's ASGI transport and an in-memory span exporter."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from prometheus_client.parser import text_string_to_metric_families

from conftest import RecordedSpans
from fleetlens import semconv as sc
from fleetlens.config import ConfigError
from fleetlens.serving import service
from fleetlens.serving.gateway import Gateway, Upstream
from fleetlens.serving.keys import KeyStore, KeysWatcher, generate_key
from fleetlens.serving.pool import Pools
from fleetlens.serving.ratelimit import InMemoryLimiter, Limits
from fleetlens.serving.redaction import default_redactor, load_redactor
from fleetlens.serving.registry import ConfigWatcher, load_models, load_routes
from fleetlens.serving.retrieval import BM25Retriever, Document, Retrievers
from fleetlens.serving.stub_upstream import StubConfig, make_app
from fleetlens.serving.tracing import tracer_provider

EXAMPLES = Path(__file__).resolve().parent.parent / "serving" / "examples"

MODELS = """\
models:
  small: {path: /m/small, served_name: small-served, variant: bf16, gpu: {type: cpu}, replicas: 1}
  large: {path: /m/large, served_name: large-served, variant: bf16, gpu: {type: cpu}, replicas: 1}
"""
ROUTES = """\
default: chat
features:
  chat: {model: small, fallback: [large], fallback_on: [error, timeout, overload], timeout_s: 5}
  strict: {model: small, fallback: [large], fallback_on: [error, timeout], timeout_s: 5}
  overload_only: {model: small, fallback: [large], fallback_on: [overload], timeout_s: 5}
  rag: {model: small, retrieval: {retriever: runbooks, top_k: 2}}
  extract: {model: small, on_invalid: error}
retrievers:
  runbooks: {type: bm25, path: docs/}
"""


class Upstreams(httpx.AsyncBaseTransport):
    """One stub app per model host ({model}.upstream); records bodies; can time out or refuse."""

    def __init__(self, tokenizer_info: bool = True) -> None:
        self.apps = {name: make_app(StubConfig(model=f"{name}-served", completion_tokens=64,
                                               tokenizer_info=tokenizer_info))
                     for name in ("small", "large")}
        self.transports = {name: httpx.ASGITransport(app=app) for name, app in self.apps.items()}
        self.bodies: list[tuple[str, str, dict[str, Any]]] = []  # (model, path, body)
        self.timeouts: set[str] = set()
        self.unreachable: set[str] = set()

    def fail(self, model: str, status: int) -> None:
        self.apps[model].state.stub.behaviour.status = status

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        model = (request.url.host or "").split(".")[0]
        content = await request.aread()
        if content:
            self.bodies.append((model, request.url.path, json.loads(content)))
        if model in self.timeouts:
            raise httpx.ReadTimeout("stub timeout", request=request)
        if model in self.unreachable:
            raise httpx.ConnectError("refused", request=request)
        return await self.transports[model].handle_async_request(request)


def make(tmp_path: Path, *, record_content: bool = False, redact: Any = None, retrievers: Retrievers | None = None,
         tokenizer_info: bool = True, provider: TracerProvider | None = None,
         **gateway_kwargs: Any) -> dict[str, Any]:
    docs = tmp_path / "docs"
    if not docs.exists():
        docs.mkdir()
        for source in (EXAMPLES / "docs").glob("*.md"):
            (docs / source.name).write_text(source.read_text())
    (tmp_path / "models.yaml").write_text(MODELS)
    (tmp_path / "routes.yaml").write_text(ROUTES)
    key, digest = generate_key()
    narrow, narrow_digest = generate_key()
    store = KeyStore.from_entries([
        {"id": "k1", "customer": "acme", "hash": digest, "feature": "chat"},
        {"id": "k2", "customer": "lab", "hash": narrow_digest, "feature": "chat", "allowed_models": ["large"]},
    ])
    watcher = ConfigWatcher(tmp_path / "models.yaml", tmp_path / "routes.yaml")
    spans = RecordedSpans()  # the gateway's own tracer, unless the test brings another provider
    provider = provider or spans.provider
    upstreams = Upstreams(tokenizer_info)
    down: set[str] = set()
    outcomes: list[tuple[str, bool]] = []

    def pick(model: str) -> Upstream | None:
        if model in down:
            return None
        return Upstream(f"{model}-0", f"http://{model}.upstream", lambda ok: outcomes.append((model, ok)))

    gateway = Gateway(lambda: watcher.config, lambda: store, InMemoryLimiter(lambda _k: Limits.per_minute(None, None)),
                      pick, provider.get_tracer("gw"), record_content=record_content, rng=random.Random(1),
                      transport=upstreams, retrievers=retrievers, redact=redact,
                      **gateway_kwargs)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://gateway")
    return {"key": key, "narrow": narrow, "gateway": gateway, "client": client, "spans": spans,
            "upstreams": upstreams, "down": down, "outcomes": outcomes, "store": store}


@pytest.fixture
def gw(tmp_path: Path) -> dict[str, Any]:
    return make(tmp_path)


def call(s: dict, path: str, body: Any = None, *, feature: str | None = None, key: str | None = None,
         method: str = "POST", params: dict | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key or s['key']}"} if key != "" else {}
    if feature:
        headers["x-fleetlens-feature"] = feature
    return asyncio.run(s["client"].request(method, path, json=body, headers=headers, params=params))


def chat(s: dict, content: str, *, feature: str | None = None, **extra: Any) -> httpx.Response:
    return call(s, "/v1/chat/completions",
                {"model": "auto", "messages": [{"role": "user", "content": content}], **extra}, feature=feature)


def by_name(s: dict) -> dict[str, list]:
    spans: dict[str, list] = {}
    for span in s["spans"].get_finished_spans():
        spans.setdefault(span.name, []).append(span)
    return spans


def all_attribute_text(s: dict) -> str:
    return " ".join(str(v) for span in s["spans"].get_finished_spans() for v in span.attributes.values())


# --------------------------------------------------------------------------- retrieval


def test_retrieval_stage_runs_between_route_and_prompt_assembly(gw) -> None:
    reply = chat(gw, "the replica ran out of GPU memory, what now?", feature="rag", max_tokens=5)
    assert reply.status_code == 200, reply.text
    spans = by_name(gw)
    (root,) = spans[sc.ROOT_SPAN]
    (route,), (retrieval,), (assembly,) = spans["route"], spans["retrieval"], spans["prompt_assembly"]
    assert retrieval.parent.span_id == root.context.span_id
    assert retrieval.attributes[sc.STAGE] == "retrieval"
    assert route.end_time <= retrieval.start_time and retrieval.end_time <= assembly.start_time
    assert retrieval.attributes[sc.RETRIEVER] == "runbooks"
    assert retrieval.attributes[sc.RETRIEVAL_DOCUMENTS] == 2
    assert retrieval.attributes[sc.RETRIEVAL_DOCUMENT_IDS][0] == "replica-oom.md"
    assert sc.RETRIEVAL_CONTENT not in retrieval.attributes
    # the passages went upstream as a system message before the user's; their text is on no span
    (_model, _path, body), = gw["upstreams"].bodies
    system, user = body["messages"]
    assert system["role"] == "system" and "gpu-memory-utilization" in system["content"]
    assert user["content"].startswith("the replica ran out")
    assert "gpu-memory-utilization" not in all_attribute_text(gw)


def test_retrieval_prefixes_completion_prompts_and_skips_features_without_it(gw) -> None:
    reply = call(gw, "/v1/completions", {"model": "auto", "prompt": "how do canary rollouts work", "max_tokens": 3},
                 feature="rag")
    assert reply.status_code == 200, reply.text
    prompt = gw["upstreams"].bodies[-1][2]["prompt"]
    assert "(canary.md)" in prompt and prompt.endswith("how do canary rollouts work")
    chat(gw, "hello there", max_tokens=2)  # feature chat: no retrieval
    assert len(by_name(gw)["retrieval"]) == 1
    assert "messages" in gw["upstreams"].bodies[-1][2] and len(gw["upstreams"].bodies[-1][2]["messages"]) == 1


def test_retrieval_records_passages_only_with_record_content(tmp_path: Path) -> None:
    s = make(tmp_path, record_content=True)
    assert chat(s, "what happens when the OTLP collector is unreachable", feature="rag", max_tokens=2).status_code == 200
    (retrieval,) = by_name(s)["retrieval"]
    passages = json.loads(retrieval.attributes[sc.RETRIEVAL_CONTENT])
    assert passages[0]["id"] == "collector-down.md" and "Telemetry never blocks" in passages[0]["content"]


def test_a_failing_retriever_costs_the_passages_not_the_request(tmp_path: Path) -> None:
    class Broken:
        async def retrieve(self, query: str, k: int) -> list[Document]:
            raise RuntimeError("index offline")

    s = make(tmp_path, retrievers=Retrievers({"runbooks": Broken()}))
    reply = chat(s, "out of memory", feature="rag", max_tokens=2)
    assert reply.status_code == 200
    (retrieval,) = by_name(s)["retrieval"]
    assert retrieval.status.status_code.name == "ERROR" and retrieval.attributes[sc.ERROR_TYPE] == "RuntimeError"
    assert retrieval.attributes[sc.RETRIEVAL_DOCUMENTS] == 0
    assert len(s["upstreams"].bodies[-1][2]["messages"]) == 1


def test_bm25_searches_in_a_thread_and_reindexes_changed_files(tmp_path: Path) -> None:
    (tmp_path / "a.md").write_text("# Disk\nThe disk is full: delete old spool segments.")
    (tmp_path / "b.txt").write_text("Tokens per minute limits live in keys.yaml.")
    (tmp_path / "ignored.json").write_text('{"disk": "full"}')
    retriever = BM25Retriever(tmp_path, refresh_s=0.0)
    assert len(retriever) == 2
    threads: list[int] = []
    search = retriever.search

    def spy(query: str, k: int) -> list[Document]:
        threads.append(threading.get_ident())
        return search(query, k)

    retriever.search = spy  # type: ignore[method-assign]
    found = asyncio.run(retriever.retrieve("disk full", 5))
    assert [d.id for d in found] == ["a.md"] and found[0].source.endswith("a.md") and found[0].score > 0
    assert threads and threads[0] != threading.get_ident()
    assert asyncio.run(retriever.retrieve("nothing matches zzz", 3)) == []
    (tmp_path / "c.md").write_text("GPU memory: lower gpu-memory-utilization.")
    assert [d.id for d in retriever.search("gpu memory", 3)] == ["c.md"]
    assert retriever.builds == 2


def test_retrieval_config_errors_are_clear(tmp_path: Path) -> None:
    registry = load_models(EXAMPLES / "models.yaml")
    bad = tmp_path / "routes.yaml"
    bad.write_text("default: a\nfeatures:\n  a: {model: qwen-small, retrieval: {retriever: wiki}}\n"
                   "retrievers:\n  docs: {type: bm25, path: nowhere/}\n  custom: {type: custom}\n")
    with pytest.raises(ConfigError) as error:
        load_routes(bad, registry)
    message = str(error.value)
    assert "features.a.retrieval.retriever: names retriever 'wiki', which is not under retrievers" in message
    assert "retrievers.docs.path" in message and "is not a directory" in message
    assert "retrievers.custom.factory: required for a custom retriever" in message
    # the shipped example declares one, relative to the routes file
    routes = load_routes(EXAMPLES / "routes.yaml", registry)
    assert routes.features["support"].retrieval.retriever == "runbooks"
    assert Path(routes.retrievers["runbooks"].path) == (EXAMPLES / "docs").resolve()


# --------------------------------------------------------------------------- fallback_on


def test_error_moves_on_when_listed(gw) -> None:
    gw["upstreams"].fail("small", 500)
    reply = chat(gw, "hi", max_tokens=2)
    assert reply.status_code == 200 and reply.json()["model"] == "large-served"
    failed = by_name(gw)["chat small"][0]
    assert failed.attributes[sc.FALLBACK_TRIGGER] == "error" and failed.status.status_code.name == "ERROR"
    assert gw["gateway"].stats.fallbacks[("small", "error")] == 1


@pytest.mark.parametrize("fault, feature, status", [
    ("503", "strict", 503),  # overload not listed: the overload error ends the request
    ("429", "strict", 503),
    ("no_replica", "strict", 503),
    ("500", "overload_only", 502),
    ("unreachable", "overload_only", 502),
    ("timeout", "overload_only", 504),
])
def test_a_trigger_not_listed_ends_the_request(gw, fault: str, feature: str, status: int) -> None:
    if fault == "no_replica":
        gw["down"].add("small")
    elif fault == "timeout":
        gw["upstreams"].timeouts.add("small")
    elif fault == "unreachable":
        gw["upstreams"].unreachable.add("small")
    else:
        gw["upstreams"].fail("small", int(fault))
    reply = chat(gw, "hi", feature=feature, max_tokens=2)
    assert reply.status_code == status, reply.text
    assert reply.json()["error"]["type"] == "server_error"
    spans = by_name(gw)
    assert "chat large" not in spans  # the fallback model was never tried
    assert spans[sc.ROOT_SPAN][0].attributes[sc.HTTP_STATUS_CODE] == status
    if status == 503:
        assert int(reply.headers["retry-after"]) >= 1


@pytest.mark.parametrize("fault", ["503", "429", "no_replica"])
def test_overload_moves_on_when_listed(gw, fault: str) -> None:
    if fault == "no_replica":
        gw["down"].add("small")
    else:
        gw["upstreams"].fail("small", int(fault))
    reply = chat(gw, "hi", feature="overload_only", max_tokens=2)
    assert reply.status_code == 200, reply.text
    assert reply.json()["model"] == "large-served"
    assert gw["gateway"].stats.fallbacks[("small", "overload")] == 1


def test_timeout_moves_on_when_listed(gw) -> None:
    gw["upstreams"].timeouts.add("small")
    reply = chat(gw, "hi", feature="strict", max_tokens=2)
    assert reply.status_code == 200 and reply.json()["model"] == "large-served"
    assert by_name(gw)["chat small"][0].attributes[sc.ERROR_TYPE] == "timeout"


# --------------------------------------------------------------------------- response_format


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def _json_schema(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}


def test_valid_json_schema_answer_is_marked_valid(gw) -> None:
    # the stub echoes the prompt's words, so a one-word JSON prompt comes back as the answer
    reply = chat(gw, '{"name":"ada"}', max_tokens=1, response_format=_json_schema(SCHEMA))
    assert reply.status_code == 200 and json.loads(reply.json()["choices"][0]["message"]["content"]) == {"name": "ada"}
    (post,) = by_name(gw)["postprocess"]
    assert post.attributes[sc.POSTPROCESS_VALID] is True and post.attributes[sc.POSTPROCESS_CHECK] == "json_schema"
    assert sc.ERROR_TYPE not in post.attributes


def test_invalid_answer_passes_by_default_but_is_recorded(gw) -> None:
    reply = chat(gw, '{"age":3}', max_tokens=1, response_format=_json_schema(SCHEMA))
    assert reply.status_code == 200
    (post,) = by_name(gw)["postprocess"]
    assert post.attributes[sc.POSTPROCESS_VALID] is False and post.attributes[sc.ERROR_TYPE] == "schema_violation"
    reply = chat(gw, "not json at all", max_tokens=3, response_format={"type": "json_object"})
    assert reply.status_code == 200
    post = by_name(gw)["postprocess"][-1]
    assert post.attributes[sc.POSTPROCESS_CHECK] == "json_object" and post.attributes[sc.ERROR_TYPE] == "invalid_json"
    assert gw["gateway"].stats.output_checks[("json_object", "false")] == 1


def test_invalid_answer_is_refused_with_on_invalid_error(gw) -> None:
    reply = chat(gw, '{"age":3}', feature="extract", max_tokens=1, response_format=_json_schema(SCHEMA))
    assert reply.status_code == 502
    error = reply.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "invalid_response_format"
    assert "'name' is a required property" in error["message"]
    spans = by_name(gw)
    (root,) = spans[sc.ROOT_SPAN]
    assert root.attributes[sc.HTTP_STATUS_CODE] == 502 and root.attributes[sc.ERROR_TYPE] == "schema_violation"
    assert root.status.status_code.name == "ERROR"
    assert spans["postprocess"][0].attributes[sc.POSTPROCESS_VALID] is False
    assert "chat small" in spans  # traced like any other request


def test_an_invalid_schema_is_a_400(gw) -> None:
    reply = chat(gw, "x", max_tokens=1, response_format=_json_schema({"type": "no-such-type"}))
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "response_format"
    reply = chat(gw, "x", max_tokens=1, response_format={"type": "json_schema", "json_schema": {"name": "n"}})
    assert reply.status_code == 400
    assert gw["upstreams"].bodies == []
    assert [r.attributes[sc.HTTP_STATUS_CODE] for r in by_name(gw)[sc.ROOT_SPAN]] == [400, 400]


# --------------------------------------------------------------------------- tokenizer passthrough


def test_tokenize_and_detokenize_go_to_the_named_model(gw) -> None:
    reply = call(gw, "/tokenize", {"model": "small", "prompt": "hello tokenizer world"})
    assert reply.status_code == 200, reply.text
    tokens = reply.json()["tokens"]
    assert reply.json()["count"] == 3
    assert gw["upstreams"].bodies[-1][:2] == ("small", "/tokenize")
    assert gw["upstreams"].bodies[-1][2]["model"] == "small-served"  # registry name → served name
    reply = call(gw, "/detokenize", {"model": "small-served", "tokens": tokens})
    assert reply.status_code == 200 and reply.json() == {"prompt": "hello tokenizer world"}
    info = call(gw, "/tokenizer_info", method="GET", params={"model": "large"})
    assert info.status_code == 200 and info.json()["eos_token"] == "</s>"
    assert gw["upstreams"].bodies[-1][0] == "small"  # GET has no body: only the POSTs were recorded
    spans = by_name(gw)
    assert spans["POST /tokenize"][0].attributes[sc.REQUEST_MODEL] == "small"
    assert spans["GET /tokenizer_info"][0].attributes[sc.REQUEST_MODEL] == "large"


def test_tokenizer_model_defaults_and_errors(gw) -> None:
    # no model: the key's only allowed model, else its feature's fixed model
    call(gw, "/tokenize", {"prompt": "a b"}, key=gw["narrow"])
    assert gw["upstreams"].bodies[-1][0] == "large"
    call(gw, "/tokenize", {"prompt": "a b"})
    assert gw["upstreams"].bodies[-1][0] == "small"
    assert call(gw, "/tokenize", {"model": "gpt-17", "prompt": "a"}).json()["error"]["code"] == "model_not_found"
    assert call(gw, "/tokenize", {"model": "gpt-17", "prompt": "a"}).status_code == 404
    assert call(gw, "/tokenize", {"model": "small", "prompt": "a"}, key="").status_code == 401
    assert call(gw, "/tokenize", {"model": "small", "prompt": "a"}, key=gw["narrow"]).status_code == 403
    gw["down"].add("small")
    assert call(gw, "/tokenize", {"model": "small", "prompt": "a"}).status_code == 503


def test_a_missing_upstream_endpoint_is_relayed(tmp_path: Path) -> None:
    s = make(tmp_path, tokenizer_info=False)
    reply = call(s, "/tokenizer_info", method="GET", params={"model": "small"})
    assert reply.status_code == 404 and reply.json() == {"detail": "Not Found"}
    assert s["gateway"].stats.passthrough[("/tokenizer_info", "404")] == 1


def test_lm_eval_remote_tokenizer_works_through_the_gateway(gw) -> None:
    """lm-eval's RemoteTokenizer (local-completions, tokenizer_backend=remote) against the gateway app."""
    import requests
    from lm_eval.utils import RemoteTokenizer
    from starlette.testclient import TestClient

    with TestClient(gw["gateway"].app, base_url="http://gateway") as test_client:
        original = requests.Session.request

        def via_test_client(self, method, url, **kwargs):  # route requests' calls into the ASGI app
            kwargs.pop("verify", None)
            kwargs.pop("timeout", None)
            return test_client.request(method, url, headers=dict(self.headers), **kwargs)

        requests.Session.request = via_test_client  # type: ignore[method-assign]
        try:
            tokenizer = RemoteTokenizer("http://gateway/v1/completions", auth_token=gw["narrow"])
            assert tokenizer.eos_token == "</s>"
            ids = tokenizer.encode("the quick fox")
            assert len(ids) == 3 and tokenizer.decode(ids) == "the quick fox"
            assert isinstance(tokenizer.eos_token_id, int)  # /tokenize of "</s>"
        finally:
            requests.Session.request = original  # type: ignore[method-assign]


# --------------------------------------------------------------------------- record_content


def test_no_text_on_spans_by_default(gw) -> None:
    secret = "mail ada@example.com about the disk"
    assert chat(gw, secret, max_tokens=4).status_code == 200
    for span in gw["spans"].get_finished_spans():
        assert sc.INPUT_MESSAGES not in span.attributes and sc.OUTPUT_MESSAGES not in span.attributes
    assert "ada@example.com" not in all_attribute_text(gw) and "disk" not in all_attribute_text(gw)


def test_record_content_puts_redacted_messages_on_the_client_span(tmp_path: Path) -> None:
    s = make(tmp_path, record_content=True)
    reply = call(s, "/v1/chat/completions", {"model": "small", "max_tokens": 4, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "mail ada@example.com key sk-abcdefghijklmnopqrstu now"}]})
    assert reply.status_code == 200
    (upstream,) = by_name(s)["chat small"]
    inputs = json.loads(upstream.attributes[sc.INPUT_MESSAGES])
    assert inputs[0] == {"role": "system", "parts": [{"type": "text", "content": "be brief"}]}
    assert inputs[1]["parts"][0]["content"] == "mail [EMAIL] key [SECRET] now"
    outputs = json.loads(upstream.attributes[sc.OUTPUT_MESSAGES])
    assert outputs[0]["role"] == "assistant" and outputs[0]["finish_reason"] == "length"
    assert outputs[0]["parts"][0]["content"] == "be brief mail [EMAIL]"
    assert "ada@example.com" not in all_attribute_text(s)


def test_record_content_in_streams_and_with_a_custom_hook(tmp_path: Path) -> None:
    s = make(tmp_path, record_content=True, redact=lambda text: text.upper())
    reply = call(s, "/v1/chat/completions", {"model": "small", "max_tokens": 3, "stream": True,
                                             "messages": [{"role": "user", "content": "one two three four"}]})
    assert reply.status_code == 200
    (upstream,) = by_name(s)["chat small"]
    assert json.loads(upstream.attributes[sc.INPUT_MESSAGES])[0]["parts"][0]["content"] == "ONE TWO THREE FOUR"
    output = json.loads(upstream.attributes[sc.OUTPUT_MESSAGES])[0]
    assert output["parts"][0]["content"] == "ONE TWO THREE" and output["finish_reason"] == "length"


def test_redaction_hooks(tmp_path: Path, monkeypatch) -> None:
    text = "call +1 555-123-4567 or bob.smith@corp.example.org; password=hunter22 Bearer abcdefgh12345678 on 2024-01-05"
    assert default_redactor(text) == "call [PHONE] or [EMAIL]; password=[SECRET] Bearer [SECRET] on 2024-01-05"
    assert default_redactor("AKIAABCDEFGHIJKLMNOP and ghp_0123456789abcdefghijklmn") == "[SECRET] and [SECRET]"
    assert load_redactor(None) is default_redactor
    (tmp_path / "my_redact.py").write_text("def scrub(text):\n    return 'x' * len(text)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_redactor("my_redact:scrub")("abc") == "xxx"
    for spec, message in [("no_such_module_xyz:f", "cannot import module"), ("my_redact:nope", "has no function"),
                          ("my_redact", "must be 'module:function'")]:
        with pytest.raises(ConfigError, match=message):
            load_redactor(spec)


# --------------------------------------------------------------------------- /metrics


def _metrics(s: dict) -> dict[str, list]:
    reply = asyncio.run(s["client"].get("/metrics"))  # no API key needed
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(reply.text)}


def test_metrics_count_requests_attempts_fallbacks_and_pools(tmp_path: Path) -> None:
    s = make(tmp_path)
    pools = Pools(load_models(EXAMPLES / "models.yaml"))
    s["gateway"].observe(pools.snapshot)
    assert chat(s, "hello", max_tokens=2).status_code == 200
    s["upstreams"].fail("small", 500)
    assert chat(s, "hello", max_tokens=2).status_code == 200
    assert call(s, "/v1/chat/completions", {"model": "gpt-17", "messages": []}).status_code == 404
    metrics = _metrics(s)
    requests = {(m.labels["status"], m.labels["model"], m.labels["feature"]): m.value
                for m in metrics["fleetlens_gateway_requests"]}
    assert requests[("200", "small", "chat")] == 1 and requests[("200", "large", "chat")] == 1
    assert requests[("404", "", "chat")] == 1
    assert all(m.labels["endpoint"] == "/v1/chat/completions" for m in metrics["fleetlens_gateway_requests"])
    assert metrics["fleetlens_gateway_in_flight"][0].value == 0
    attempts = {(m.labels["model"], m.labels["outcome"]): m.value for m in metrics["fleetlens_gateway_upstream_attempts"]}
    assert attempts == {("small", "ok"): 1, ("small", "error"): 1, ("large", "ok"): 1}
    assert [(m.labels, m.value) for m in metrics["fleetlens_gateway_fallbacks"]] == [
        ({"model": "small", "trigger": "error"}, 1)]
    healthy = {m.labels["replica"]: m.value for m in metrics["fleetlens_gateway_replica_healthy"]}
    assert healthy == {"10.0.4.17:8000": 1}
    assert metrics["fleetlens_gateway_replica_outstanding"][0].labels["model"] == "llama-large-int4"


def test_a_dead_collector_loses_spans_not_requests(tmp_path: Path) -> None:
    class DeadCollector(SpanExporter):
        def export(self, spans):
            return SpanExportResult.FAILURE

        def shutdown(self) -> None:
            pass

    provider, stats = tracer_provider(DeadCollector())
    s = make(tmp_path, provider=provider, export_stats=stats)
    assert [chat(s, "hi", max_tokens=1).status_code for _ in range(3)] == [200, 200, 200]
    provider.force_flush()
    assert stats.failed_spans >= 3 * 6 and stats.exported_spans == 0
    metrics = _metrics(s)
    assert metrics["fleetlens_gateway_spans_dropped"][0].value == stats.failed_spans
    assert metrics["fleetlens_gateway_spans_exported"][0].value == 0
    provider.shutdown()


# --------------------------------------------------------------------------- keys.yaml reload


def test_keys_reload_and_a_bad_file_keeps_the_old_keys(tmp_path: Path, caplog) -> None:
    first, first_digest = generate_key()
    second, second_digest = generate_key()
    path = tmp_path / "keys.yaml"
    path.write_text(f"- {{id: k1, customer: acme, hash: '{first_digest}'}}\n")
    store = KeyStore.from_yaml(path)
    watcher = KeysWatcher(path, store)
    assert watcher.check() is False  # unchanged
    path.write_text(f"- {{id: k2, customer: beta, hash: '{second_digest}', rpm: 5}}\n")
    assert watcher.check() is True
    assert store.authenticate(first) is None and store.authenticate(second).customer == "beta"
    assert store.get("k2").rpm == 5  # the limiter's limits_for reads the same store
    with caplog.at_level(logging.ERROR):
        path.write_text("- {id: k3, customer: x, hash: 'sha256:nothex'}\n  broken: [\n")
        assert watcher.check() is False
    assert "API keys not reloaded" in caplog.text and "previous 1 keys stay in service" in caplog.text
    assert watcher.last_error and str(path) in watcher.last_error
    assert store.authenticate(second) is not None
    path.write_text(f"- {{id: k1, customer: acme, hash: '{first_digest}', key: {first}}}\n")  # plaintext key
    assert watcher.check() is False and "plaintext" in watcher.last_error
    assert store.authenticate(second) is not None


def test_the_reload_loop_watches_keys(tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text(MODELS)
    (tmp_path / "routes.yaml").write_text(ROUTES.replace("retrievers:\n  runbooks: {type: bm25, path: docs/}\n", "")
                                          .replace("  rag: {model: small, retrieval: {retriever: runbooks, top_k: 2}}\n", ""))
    watcher = ConfigWatcher(tmp_path / "models.yaml", tmp_path / "routes.yaml")
    pools = Pools(watcher.config.registry)
    key, digest = generate_key()
    path = tmp_path / "keys.yaml"
    path.write_text("[]\n")
    store = KeyStore.from_yaml(path)
    keys = KeysWatcher(path, store)

    async def scenario() -> None:
        task = asyncio.create_task(service._reload(watcher, pools, 0.01, keys))
        path.write_text(f"- {{id: k1, customer: acme, hash: '{digest}'}}\n")
        for _ in range(200):
            await asyncio.sleep(0.01)
            if store.authenticate(key) is not None:
                break
        task.cancel()

    asyncio.run(scenario())
    assert store.authenticate(key) is not None and keys.reloads == 1
