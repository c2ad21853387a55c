"""How a relayed stream ends (serving/sse_relay.py + the gateway's relay): a client that leaves
mid-stream, an upstream that breaks off mid-stream, and accounting that runs after the client has
its last byte. Driven in-process through the ASGI interface, as uvicorn calls the app, with an
upstream whose stream arrives chunk by chunk."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from conftest import RecordedSpans, run_async
from fleetlens import semconv as sc
from fleetlens.serving.gateway import Gateway, Upstream
from fleetlens.serving.keys import KeyStore, generate_key
from fleetlens.serving.ratelimit import InMemoryLimiter, Limits
from fleetlens.serving.registry import ConfigWatcher
from fleetlens.serving.sse_relay import SSERelayResponse

MODELS = "models:\n  small: {path: /m/small, served_name: small-served, variant: bf16, gpu: {type: cpu}, replicas: 1}\n"
ROUTES = "default: chat\nfeatures:\n  chat: {model: small, timeout_s: 5}\n"
TOKENS = 8


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def sse_chunks() -> list[bytes]:
    chunks = [_event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})]
    chunks += [_event({"choices": [{"index": 0, "delta": {"content": f"t{i} "}}]}) for i in range(TOKENS)]
    chunks.append(_event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}))
    chunks.append(_event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": TOKENS,
                                                   "total_tokens": 3 + TOKENS}}))
    return chunks + [b"data: [DONE]\n\n"]


class PacedStream(httpx.AsyncByteStream):
    """An upstream SSE body arriving a chunk every `gap_s`; raises ReadError before chunk `break_at`."""

    def __init__(self, gap_s: float, break_at: int | None) -> None:
        self.gap_s = gap_s
        self.break_at = break_at
        self.sent = 0
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for index, chunk in enumerate(sse_chunks()):
            if index == self.break_at:
                raise httpx.ReadError("connection reset by peer")
            self.sent += 1
            yield chunk
            await asyncio.sleep(self.gap_s)

    async def aclose(self) -> None:
        self.closed = True


class PacedUpstream(httpx.AsyncBaseTransport):
    def __init__(self, gap_s: float = 0.01, break_at: int | None = None) -> None:
        self.gap_s = gap_s
        self.break_at = break_at
        self.streams: list[PacedStream] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        stream = PacedStream(self.gap_s, self.break_at)
        self.streams.append(stream)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=stream)


def make(tmp_path: Path, upstream: PacedUpstream) -> dict[str, Any]:
    (tmp_path / "models.yaml").write_text(MODELS)
    (tmp_path / "routes.yaml").write_text(ROUTES)
    key, digest = generate_key()
    store = KeyStore.from_entries([{"id": "k1", "customer": "acme", "hash": digest, "feature": "chat"}])
    watcher = ConfigWatcher(tmp_path / "models.yaml", tmp_path / "routes.yaml")
    spans = RecordedSpans()
    outcomes: list[bool] = []
    gateway = Gateway(lambda: watcher.config, lambda: store, InMemoryLimiter(lambda _k: Limits.per_minute(None, None)),
                      lambda model: Upstream(f"{model}-0", f"http://{model}.upstream", outcomes.append),
                      spans.provider.get_tracer("gw"), rng=random.Random(1), transport=upstream)
    return {"gateway": gateway, "key": key, "spans": spans, "outcomes": outcomes}


async def call(setup: dict[str, Any], *, leave_after_chunks: int | None = None) -> list[dict[str, Any]]:
    """POST a streaming chat completion to the gateway's ASGI app the way uvicorn does (spec 2.3:
    `receive()` answers http.disconnect once the client is gone or the response is complete);
    the client leaves after `leave_after_chunks` body chunks when given. Returns what was sent."""
    body = json.dumps({"model": "auto", "stream": True, "messages": [{"role": "user", "content": "hi"}]}).encode()
    sent: list[dict[str, Any]] = []
    delivered = False
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if gone.is_set():
            return  # what uvicorn does with a send after the client left
        sent.append(message)
        chunks = [m for m in sent if m["type"] == "http.response.body" and m.get("body")]
        if leave_after_chunks is not None and len(chunks) >= leave_after_chunks:
            gone.set()
        if message["type"] == "http.response.body" and not message.get("more_body"):
            gone.set()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions",
             "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
             "headers": [(b"authorization", f"Bearer {setup['key']}".encode()),
                         (b"content-type", b"application/json")],
             "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080)}
    await setup["gateway"].app(scope, receive, send)
    return sent


def _spans(setup: dict[str, Any]) -> dict[str, Any]:
    return {span.name: span for span in setup["spans"].get_finished_spans()}


@run_async
async def test_whole_stream_relayed_then_accounted(tmp_path: Path) -> None:
    upstream = PacedUpstream(gap_s=0.001)
    setup = make(tmp_path, upstream)
    sent = await call(setup)
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    assert sent[0]["status"] == 200 and dict(sent[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
    assert b"".join(bodies) == b"".join(sse_chunks()) and sent[-1] == {"type": "http.response.body", "body": b"",
                                                                        "more_body": False}
    spans = _spans(setup)
    assert spans[sc.ROOT_SPAN].attributes[sc.HTTP_STATUS_CODE] == 200
    assert spans["chat small"].attributes[sc.USAGE_OUTPUT_TOKENS] == TOKENS
    assert upstream.streams[0].closed and setup["outcomes"] == [True]


@run_async
async def test_client_leaving_mid_stream_stops_the_upstream_and_is_traced_499(tmp_path: Path) -> None:
    upstream = PacedUpstream(gap_s=0.05)
    setup = make(tmp_path, upstream)
    sent = await call(setup, leave_after_chunks=3)
    await asyncio.sleep(0.2)  # the upstream would have sent everything by now, had it not been closed
    stream = upstream.streams[0]
    assert stream.closed and stream.sent < len(sse_chunks()) - 2, stream.sent
    assert not any(m["type"] == "http.response.body" and not m.get("more_body") for m in sent)
    spans = _spans(setup)
    root = spans[sc.ROOT_SPAN]
    assert root.attributes[sc.HTTP_STATUS_CODE] == 499
    assert root.status.status_code.name != "ERROR"  # a client that leaves is not a server error
    assert "postprocess" in spans and setup["outcomes"] == [True]  # the replica did nothing wrong


@run_async
async def test_upstream_breaking_off_mid_stream_ends_with_an_error_event_and_502(tmp_path: Path) -> None:
    upstream = PacedUpstream(gap_s=0.001, break_at=4)
    setup = make(tmp_path, upstream)
    sent = await call(setup)
    text = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body").decode()
    events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert len(events) == 4 + 2 and events[-1] == "[DONE]"  # what arrived, the error, the end
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and "broke off" in error["message"]
    assert sent[-1]["more_body"] is False  # a proper end: SDKs raise on the error event
    spans = _spans(setup)
    root, attempt = spans[sc.ROOT_SPAN], spans["chat small"]
    assert root.attributes[sc.HTTP_STATUS_CODE] == 502 and root.status.status_code.name == "ERROR"
    assert attempt.status.status_code.name == "ERROR" and attempt.attributes[sc.ERROR_TYPE] == "ReadError"
    assert setup["outcomes"] == [False] and setup["gateway"].stats.upstream_attempts[("small", "broken_stream")] == 1


@run_async
async def test_finish_runs_after_the_client_has_the_last_byte() -> None:
    order: list[str] = []

    async def chunks() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"

    async def finish(outcome: int) -> None:
        order.append(f"finish {outcome}")

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {}

    async def send(message: dict[str, Any]) -> None:
        order.append("end" if message["type"] == "http.response.body" and not message["more_body"] else message["type"])

    await SSERelayResponse(chunks(), finish)({"type": "http"}, receive, send)
    assert order == ["http.response.start", "http.response.body", "end", "finish 200"]
