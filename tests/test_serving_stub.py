"""The stub upstream speaks vLLM's OpenAI shapes and misbehaves exactly when told to.

Most tests talk to the app in-process (httpx ASGITransport: no sockets, milliseconds); pacing and
the command-line entry point use a real listening server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
import orjson
import pytest

from fleetlens.net import free_port
from fleetlens.serving.stub_upstream import StubConfig, StubServer, make_app

PROMPT = "the quick brown fox"


def client(config: StubConfig | None = None) -> httpx.Client:
    """A sync client over the ASGI app (the transport runs the app on a private loop)."""
    app = make_app(config or StubConfig(model="m", completion_tokens=6))
    transport = httpx.ASGITransport(app=app)

    class _Sync:
        """Tiny sync facade: each call runs one async request."""

        def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
            async def go() -> httpx.Response:
                async with httpx.AsyncClient(transport=transport, base_url="http://stub") as c:
                    response = await c.request(method, path, **kw)
                    await response.aread()
                    return response
            return asyncio.run(go())

        def get(self, path: str, **kw: Any) -> httpx.Response:
            return self.request("GET", path, **kw)

        def post(self, path: str, **kw: Any) -> httpx.Response:
            return self.request("POST", path, **kw)

    return _Sync()  # type: ignore[return-value]


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": PROMPT}], **extra}


def sse_events(text: str) -> list[Any]:
    """Parse `data: ...` events; [DONE] stays the string "[DONE]"."""
    assert text.endswith("\n\n")
    events = []
    for block in text.strip("\n").split("\n\n"):
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return events


def test_chat_completion_non_streaming_text_and_usage():
    c = client()
    body = c.post("/v1/chat/completions", json=chat_body(max_tokens=3)).json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "m"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "the quick brown"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7}
    # No max_tokens (or a larger one): the configured length, cycling the prompt's words.
    body = c.post("/v1/chat/completions", json=chat_body(max_completion_tokens=100)).json()
    assert body["choices"][0]["message"]["content"] == "the quick brown fox the quick"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 6


def test_completions_non_streaming():
    body = client().post("/v1/completions", json={"model": "m", "prompt": "a b", "max_tokens": 5}).json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "a b a b a"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}


def test_chat_stream_with_include_usage():
    c = client()
    response = c.post("/v1/chat/completions", json=chat_body(
        max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk, finish_chunk = chunks[-1], chunks[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9}
    assert finish_chunk["choices"][0]["finish_reason"] == "length"
    assert all(chunk["usage"] is None for chunk in chunks[:-1])  # as OpenAI: null until the last
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-2])
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks[:-1])
    plain = c.post("/v1/chat/completions", json=chat_body(max_tokens=5)).json()
    assert text == plain["choices"][0]["message"]["content"] == "the quick brown fox the"
    assert len({chunk["id"] for chunk in chunks}) == 1


def test_completions_stream_without_usage():
    response = client().post("/v1/completions", json={"prompt": "x y z", "stream": True, "max_tokens": 3})
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all("usage" not in chunk for chunk in chunks)
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == "x y z"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(chunk["object"] == "text_completion" for chunk in chunks)


def test_admin_fails_next_n_requests_then_recovers():
    c = client()
    assert c.post("/admin/behaviour", json={"status": 503, "count": 3}).status_code == 200
    statuses = [c.post("/v1/chat/completions", json=chat_body()).status_code for _ in range(4)]
    assert statuses == [503, 503, 503, 200]
    # status without count: every request until reset
    c.post("/admin/behaviour", json={"status": 500})
    failed = c.post("/v1/completions", json={"prompt": "p"})
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "StubInjectedError"
    assert c.post("/v1/completions", json={"prompt": "p"}).status_code == 500
    c.post("/admin/behaviour", json={"reset": True})
    assert c.post("/v1/completions", json={"prompt": "p"}).status_code == 200
    assert c.post("/admin/behaviour", json={"bogus": 1}).status_code == 400
    assert c.post("/admin/behaviour", json={"status": "503"}).status_code == 400
    assert c.get("/admin/behaviour").json()["status"] is None


def test_admin_hang_and_health_status():
    c = client()
    c.post("/admin/behaviour", json={"hang_s": 0.2, "count": 1})
    started = time.monotonic()
    assert c.post("/v1/completions", json={"prompt": "p"}).status_code == 200
    assert time.monotonic() - started >= 0.2
    started = time.monotonic()
    c.post("/v1/completions", json={"prompt": "p"})
    assert time.monotonic() - started < 0.15  # count 1: only the first request hung
    assert c.get("/health").status_code == 200
    c.post("/admin/behaviour", json={"health_status": 503})
    assert c.get("/health").status_code == 503


def test_fail_rate_is_a_seeded_share():
    c = client(StubConfig(model="m", fail_rate=0.5, fail_status=503, seed=7))
    statuses = [c.post("/v1/completions", json={"prompt": "p"}).status_code for _ in range(200)]
    assert set(statuses) == {200, 503}
    assert 60 < statuses.count(503) < 140
    again = client(StubConfig(model="m", fail_rate=0.5, fail_status=503, seed=7))
    assert [again.post("/v1/completions", json={"prompt": "p"}).status_code for _ in range(200)] == statuses


def test_request_headers_are_recorded():
    c = client()
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    c.post("/v1/chat/completions", json=chat_body(), headers={"traceparent": traceparent})
    c.get("/health")  # not recorded: probes would drown the requests under test
    recorded = c.get("/admin/requests").json()
    assert recorded["total"] == 1
    [entry] = recorded["requests"]
    assert entry["path"] == "/v1/chat/completions" and entry["method"] == "POST"
    assert entry["headers"]["traceparent"] == traceparent
    assert c.request("DELETE", "/admin/requests").status_code == 204
    assert c.get("/admin/requests").json()["requests"] == []


def test_recorded_requests_are_bounded():
    c = client(StubConfig(model="m", record_requests=3))
    for i in range(5):
        c.post("/v1/completions", json={"prompt": "p"}, headers={"x-n": str(i)})
    requests = c.get("/admin/requests").json()["requests"]
    assert [r["headers"]["x-n"] for r in requests] == ["2", "3", "4"]


def test_models_tokenize_and_errors():
    c = client()
    models = c.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["m"]
    tokens = c.post("/tokenize", json={"model": "m", "prompt": "one two three"}).json()
    assert tokens["count"] == 3 and len(tokens["tokens"]) == 3
    assert tokens == c.post("/tokenize", json={"prompt": "one two three"}).json()  # deterministic
    assert c.post("/tokenize", json={"messages": [{"role": "user", "content": "a b"}]}).json()["count"] == 2
    unknown = c.post("/v1/chat/completions", json={**chat_body(), "model": "other"})
    assert unknown.status_code == 404 and "does not exist" in unknown.json()["error"]["message"]
    assert c.post("/v1/chat/completions", content=b"{not json").status_code == 400
    assert c.post("/v1/chat/completions", json={"model": "m"}).status_code == 400
    assert c.post("/v1/completions", json={"prompt": 5}).status_code == 400


def test_abort_after_tokens_truncates_stream():
    c = client()
    c.post("/admin/behaviour", json={"abort_after_tokens": 2})
    events = sse_events(c.post("/v1/completions", json={"prompt": "a b c", "stream": True}).text)
    assert "[DONE]" not in events
    assert [e["choices"][0]["text"] for e in events] == ["a", " b"]


def test_cpu_per_request_is_small():
    """The app's own CPU per plain chat request (no HTTP parsing): aim < 0.3 ms; assert loosely."""
    app = make_app(StubConfig(model="m"))
    body = orjson.dumps(chat_body(max_tokens=16))
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
        "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
    }

    async def one() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            pass

        await app(scope, receive, send)

    async def many(n: int) -> float:
        for _ in range(50):
            await one()
        started = time.process_time()
        for _ in range(n):
            await one()
        return (time.process_time() - started) / n

    per_request = asyncio.run(many(1000))
    assert per_request < 0.001, f"{per_request * 1000:.3f} ms CPU per request"


def test_stream_pacing_over_real_socket():
    with StubServer(StubConfig(model="m", tokens_per_s=100)) as stub:
        started = time.monotonic()
        with httpx.stream("POST", stub.url + "/v1/completions",
                          json={"prompt": "a", "stream": True, "max_tokens": 10}) as response:
            text = response.read().decode()
        elapsed = time.monotonic() - started
    assert text.endswith("data: [DONE]\n\n")
    assert 0.09 <= elapsed < 2.0  # 10 tokens at 100/s


def test_command_line_entry_point():
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "fleetlens.serving.stub_upstream", "--port", str(port), "--model", "cli-m",
         "--latency-ms", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(url + "/health", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
            assert time.monotonic() < deadline, "stub did not start"
            time.sleep(0.05)
        body = httpx.post(url + "/v1/chat/completions", json={
            "model": "cli-m", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2,
        }).json()
        assert body["choices"][0]["message"]["content"] == "hi there"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.mark.parametrize("host", ["127.0.0.1"])
def test_stub_server_binds_loopback_by_default(host):
    with StubServer(StubConfig(model="m")) as stub:
        assert stub.host == host
        assert httpx.get(stub.url + "/health").status_code == 200
