"""The gateway's upstream transport (httpx API over aiohttp's pool) on real loopback sockets: bodies,
headers and streams arrive intact, connections are reused, and every failure surfaces as the httpx
exception the gateway's fallback rules key on."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import httpx
import pytest

from conftest import RecordedSpans, run_async
from fleetlens.net import free_port
from fleetlens.serving.stub_upstream import StubConfig, StubServer
from fleetlens.serving.upstream_http import AiohttpTransport


@pytest.fixture
def stub():
    server = StubServer(StubConfig(model="m", completion_tokens=5)).start()
    yield server
    server.stop()


def _client(**timeouts: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=AiohttpTransport(), timeout=httpx.Timeout(5.0, **timeouts))


@run_async
async def test_json_and_stream_round_trip_on_reused_connections(stub: StubServer) -> None:
    async with _client() as client:
        body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "héllo"}]}
        for _ in range(3):
            reply = await client.post(stub.url + "/v1/chat/completions", json=body,
                                      headers={"traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01"})
            assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5
        request = client.build_request("POST", stub.url + "/v1/chat/completions",
                                       json={**body, "stream": True, "stream_options": {"include_usage": True}})
        response = await client.send(request, stream=True)
        raw = b"".join([chunk async for chunk in response.aiter_raw()])
        await response.aclose()
    events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == 5
    assert response.headers["content-type"].startswith("text/event-stream")
    assert stub.state.requests_total == 4


@run_async
async def test_refused_connection_is_a_connect_error() -> None:
    async with _client() as client:
        with pytest.raises(httpx.ConnectError):
            await client.post(f"http://127.0.0.1:{free_port()}/v1/completions", json={})


@run_async
async def test_silent_upstream_is_a_read_timeout() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    try:
        async with _client(read=0.3) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(f"http://127.0.0.1:{port}/v1/completions", json={})
    finally:
        listener.close()


@run_async
async def test_upstream_dying_mid_stream_is_a_transport_error() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                     b"10\r\ndata: {\"a\": 1}\n\n\r\n")
        await writer.drain()
        writer.close()  # no terminating chunk: the replica died

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with _client() as client:
            response = await client.send(client.build_request("POST", f"http://127.0.0.1:{port}/x", json={}),
                                         stream=True)
            assert response.status_code == 200
            with pytest.raises(httpx.TransportError):
                async for _ in response.aiter_raw():
                    pass
            await response.aclose()
    finally:
        server.close()


@run_async
async def test_connection_closed_unanswered_is_sent_again() -> None:
    """A replica that closes a kept-alive connection just as the next request is written on it (its
    idle timeout racing the reuse): the request is sent once more, and answered, instead of failing."""
    answered: list[int] = []

    async def one_answer_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        answered.append(len(answered))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request on this connection: closed unanswered
        writer.close()

    server = await asyncio.start_server(one_answer_per_connection, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/completions"
    try:
        async with _client() as client:
            for _ in range(3):
                assert (await client.post(url, json={"prompt": "x"})).status_code == 200
    finally:
        server.close()
    assert answered == [0, 1, 2]  # three connections, each answering once


@pytest.mark.parametrize("stream", [False, True])
def test_replica_dying_before_its_first_bytes_falls_back_unseen(stream: bool) -> None:
    """A replica that answers 200 and dies before the body (plain) or the first chunk (stream) is
    one more failed attempt; the fallback model answers and the client sees a clean 200."""
    import random


    from fleetlens.serving.gateway import Gateway, Upstream
    from fleetlens.serving.keys import KeyStore, generate_key
    from fleetlens.serving.ratelimit import InMemoryLimiter, Limits
    from fleetlens.serving.registry import ConfigWatcher

    examples = Path(__file__).resolve().parents[1] / "serving" / "examples"
    key, digest = generate_key()
    store = KeyStore.from_entries([{"id": "k1", "customer": "acme", "hash": digest, "feature": "summarize"}])
    watcher = ConfigWatcher(examples / "models.yaml", examples / "routes.yaml")
    exporter = RecordedSpans()
    provider = exporter.provider

    async def dying(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = (b"content-type: text/event-stream\r\ntransfer-encoding: chunked\r\n" if stream
                else b"content-type: application/json\r\ncontent-length: 500\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n" + head + b"\r\n" + (b"" if stream else b'{"id": "partial'))
        await writer.drain()
        writer.close()

    async def scenario() -> tuple[httpx.Response, list]:
        server = await asyncio.start_server(dying, "127.0.0.1", 0)
        dead_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        stub = StubServer(StubConfig(model="qwen2.5-1.5b", completion_tokens=4)).start()
        try:
            def pick(model: str) -> Upstream:
                return Upstream(f"{model}-0", stub.url if model == "qwen-small" else dead_url, lambda ok: None)

            gateway = Gateway(lambda: watcher.config, lambda: store,
                              InMemoryLimiter(lambda _k: Limits.per_minute(None, None)), pick,
                              provider.get_tracer("gw"), rng=random.Random(3))
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app),
                                         base_url="http://gateway") as client:
                reply = await client.post("/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                          json={"model": "auto", "stream": stream, "max_tokens": 4,
                                                "messages": [{"role": "user", "content": "summarize this"}]})
                await reply.aread()
            await gateway.aclose()
            return reply, exporter.get_finished_spans()
        finally:
            stub.stop()
            server.close()

    reply, spans = asyncio.run(scenario())
    assert reply.status_code == 200, reply.text
    if stream:
        assert reply.text.rstrip().endswith("data: [DONE]")
    else:
        assert reply.json()["usage"]["completion_tokens"] == 4
    attempts = sorted((s for s in spans if s.name.startswith("chat ")), key=lambda s: s.attributes["fleetlens.attempt"])
    assert [s.name for s in attempts][-1] == "chat qwen-small"
    assert all(s.attributes.get("fleetlens.fallback.trigger") == "error" for s in attempts[:-1])
    assert len(attempts) >= 2
