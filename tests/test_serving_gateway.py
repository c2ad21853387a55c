"""The gateway's pipeline in-process: auth, rate limit, routing, fallback, streaming relay, and one
trace per request with a span per stage. Upstreams here are a small OpenAI-shaped ASGI stand-in
(vLLM itself is exercised by the end-to-end tests), reached through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from conftest import RecordedSpans
from fleetlens import semconv as sc
from fleetlens.serving.gateway import Gateway, Upstream
from fleetlens.serving.keys import KeyStore, generate_key
from fleetlens.serving.ratelimit import InMemoryLimiter, Limits
from fleetlens.serving.registry import ConfigWatcher

EXAMPLES = Path(__file__).resolve().parent.parent / "serving" / "examples"


class StandIn:
    """OpenAI-shaped upstream per base URL: answers, fails (status) or records headers."""

    def __init__(self) -> None:
        self.fail: dict[str, int] = {}  # host -> status to answer
        self.headers: list[dict[str, str]] = []
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> Response:
        host = request.url.hostname or ""
        self.headers.append(dict(request.headers))
        if host in self.fail:
            return JSONResponse({"error": {"message": "boom"}}, status_code=self.fail[host])
        body = await request.json()
        words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        out = min(int(body.get("max_tokens") or 5), 5)
        usage = {"prompt_tokens": words, "completion_tokens": out, "total_tokens": words + out}
        if body.get("stream"):
            async def events():
                for i in range(out):
                    yield ("data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": f"t{i} "},
                                                               "finish_reason": None}]}) + "\n\n").encode()
                yield ("data: " + json.dumps({"choices": [{"index": 0, "delta": {},
                                                           "finish_reason": "length"}]}) + "\n\n").encode()
                if (body.get("stream_options") or {}).get("include_usage"):
                    yield ("data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n").encode()
                yield b"data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return JSONResponse({"id": "x", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "t " * out},
                                          "finish_reason": "length"}], "usage": usage})


@pytest.fixture
def setup(tmp_path: Path):
    key, digest = generate_key()
    other, other_digest = generate_key()
    store = KeyStore.from_entries([
        {"id": "k1", "customer": "acme", "hash": digest, "feature": "chat", "rpm": 1000, "tpm": 100000},
        {"id": "k2", "customer": "tiny", "hash": other_digest, "rpm": 2, "tpm": 100000},
    ])
    limits = {"k1": Limits.per_minute(1000, 100000), "k2": Limits.per_minute(2, 100000)}
    limiter = InMemoryLimiter(lambda kid: limits[kid])
    watcher = ConfigWatcher(EXAMPLES / "models.yaml", EXAMPLES / "routes.yaml")
    exporter = RecordedSpans()
    provider = exporter.provider
    stand_in = StandIn()
    outcomes: list[tuple[str, bool]] = []

    def pick(model: str) -> Upstream:
        replica = f"{model}-0"
        return Upstream(replica, f"http://{model}.upstream", lambda ok: outcomes.append((replica, ok)))

    transport = httpx.ASGITransport(app=stand_in.app)
    gateway = Gateway(lambda: watcher.config, lambda: store, limiter, pick, provider.get_tracer("gw"),
                      rng=random.Random(1), transport=transport)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://gateway")
    return {"key": key, "other": other, "gateway": gateway, "client": client, "spans": exporter,
            "stand_in": stand_in, "outcomes": outcomes}


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _post(s: dict, body: Any, key: str | None = None, headers: dict | None = None) -> httpx.Response:
    auth = {"authorization": f"Bearer {key or s['key']}"} if key != "" else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return _run(s["client"].post("/v1/chat/completions", content=content,
                                 headers={"content-type": "application/json", **auth, **(headers or {})}))


def _trace(s: dict) -> dict[str, list]:
    spans: dict[str, list] = {}
    for span in s["spans"].get_finished_spans():
        spans.setdefault(span.name, []).append(span)
    return spans


def test_one_request_one_trace_with_every_stage(setup) -> None:
    reply = _post(setup, {"model": "qwen-small", "messages": [{"role": "user", "content": "hi there"}],
                          "max_tokens": 3})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    spans = _trace(setup)
    root = spans[sc.ROOT_SPAN][0]
    for stage in ("auth", "rate_limit", "route", "prompt_assembly", "postprocess"):
        (span,) = spans[stage]
        assert span.parent.span_id == root.context.span_id and span.context.trace_id == root.context.trace_id
    (upstream,) = spans["chat qwen-small"]
    assert upstream.kind.name == "CLIENT" and upstream.parent.span_id == root.context.span_id
    assert upstream.attributes[sc.USAGE_INPUT_TOKENS] == 2 and upstream.attributes[sc.USAGE_OUTPUT_TOKENS] == 3
    assert upstream.attributes[sc.MODEL_VARIANT] == "bf16"
    assert root.attributes[sc.CUSTOMER] == "acme" and root.attributes[sc.FEATURE] == "chat"
    assert root.attributes[sc.HTTP_STATUS_CODE] == 200 and root.attributes[sc.ROUTE] == "explicit"
    # traceparent went upstream and names the CLIENT span
    traceparent = setup["stand_in"].headers[-1]["traceparent"]
    assert traceparent.split("-")[1] == format(root.context.trace_id, "032x")
    assert traceparent.split("-")[2] == format(upstream.context.span_id, "016x")
    # no prompt text anywhere on spans
    assert not any("hi there" in str(v) for sp in setup["spans"].get_finished_spans() for v in sp.attributes.values())


def test_streaming_relays_chunks_and_counts_usage(setup) -> None:
    reply = _post(setup, {"model": "qwen-small", "stream": True, "max_tokens": 4,
                          "messages": [{"role": "user", "content": "one two three"}]})
    assert reply.status_code == 200
    events = [line[6:] for line in reply.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    spans = _trace(setup)
    (upstream,) = spans["chat qwen-small"]
    assert upstream.attributes[sc.USAGE_OUTPUT_TOKENS] == 4
    assert upstream.attributes[sc.RESPONSE_FINISH_REASONS] == ("length",)
    assert upstream.attributes[sc.TIME_TO_FIRST_CHUNK] >= 0
    assert spans[sc.ROOT_SPAN][0].attributes[sc.USAGE_OUTPUT_TOKENS] == 4


def test_routing_by_feature_and_fallback_on_upstream_error(setup) -> None:
    setup["stand_in"].fail["llama-large.upstream"] = 503
    reply = _post(setup, {"model": "auto", "max_tokens": 900, "messages": [
        {"role": "user", "content": "prove step by step and debug " + "word " * 3000}]})
    assert reply.status_code == 200, reply.text
    spans = _trace(setup)
    attempts = [name for name in spans if name.startswith("chat ")]
    assert "chat llama-large" in attempts and len(attempts) >= 2  # the large model failed, another answered
    failed = spans["chat llama-large"][0]
    assert failed.status.status_code.name == "ERROR" and failed.attributes[sc.ERROR_TYPE] == "503"
    assert spans[sc.ROOT_SPAN][0].attributes[sc.ROUTE] == "cascade"
    assert ("llama-large-0", False) in setup["outcomes"]


@pytest.mark.parametrize("case, status, code", [
    ("no key", 401, "invalid_api_key"),
    ("wrong key", 401, "invalid_api_key"),
    ("bad json", 400, None),
    ("unknown model", 404, "model_not_found"),
    ("upstream down", 502, None),
])
def test_errors_have_the_right_status_and_are_traced(setup, case: str, status: int, code: str | None) -> None:
    body: Any = {"model": "qwen-small", "messages": [{"role": "user", "content": "x"}]}
    key = None
    if case == "no key":
        key = ""
    elif case == "wrong key":
        key = "fl-not-a-key"
    elif case == "bad json":
        body = b"{not json"
    elif case == "unknown model":
        body["model"] = "gpt-17"
    elif case == "upstream down":
        setup["stand_in"].fail["qwen-small.upstream"] = 500
    reply = _post(setup, body, key=key)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and (code is None or error["code"] == code)
    (root,) = _trace(setup)[sc.ROOT_SPAN]
    assert root.attributes[sc.HTTP_STATUS_CODE] == status


def test_rate_limit_answers_429_with_retry_after_and_is_traced(setup) -> None:
    body = {"model": "qwen-small", "messages": [{"role": "user", "content": "x"}]}
    statuses = [_post(setup, body, key=setup["other"]).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    last = _post(setup, body, key=setup["other"])
    assert last.status_code == 429 and int(last.headers["retry-after"]) >= 1
    roots = _trace(setup)[sc.ROOT_SPAN]
    assert [r.attributes[sc.HTTP_STATUS_CODE] for r in roots].count(429) == 2
    assert all(r.attributes[sc.CUSTOMER] == "tiny" for r in roots)


def test_a_route_named_as_model_takes_that_route_whatever_the_feature(setup) -> None:
    """An eval run tagged feature `eval` judges the `autocomplete` route as its traffic takes it: the
    request is attributed to `eval` and answered by the route's model; a name that is neither a
    route nor a model stays a 404."""
    reply = _post(setup, {"model": "autocomplete", "messages": [{"role": "user", "content": "x"}]},
                  headers={"X-FleetLens-Feature": "eval"})
    assert reply.status_code == 200, reply.text
    (root,) = _trace(setup)[sc.ROOT_SPAN]
    assert root.attributes[sc.FEATURE] == "eval"
    assert root.attributes[sc.REQUEST_MODEL] == "qwen-small"
    assert "chat qwen-small" in _trace(setup)
    missing = _post(setup, {"model": "no-such-route", "messages": [{"role": "user", "content": "x"}]},
                    headers={"X-FleetLens-Feature": "eval"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
