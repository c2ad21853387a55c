"""The Redis-backed rate limiter against a real `redis-server` (started here on a free loopback port):
the same bucket arithmetic as the in-memory limiter, one budget shared by several limiters and by
several gateways, TTLs, and the failure policy (Redis killed or hung: fail open and count, or 503).

Nothing is skipped: without `redis-server` on PATH these tests fail and say how to install it."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
import redis
from conftest import RecordedSpans, free_port, stop_group, wait_for
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fleetlens import semconv as sc
from fleetlens.config import ConfigError, GatewaySettings, load_settings
from fleetlens.serving.gateway import Gateway, Upstream
from fleetlens.serving.keys import KeyStore, generate_key
from fleetlens.serving.ratelimit import (
    REQUESTS,
    TOKENS,
    InMemoryLimiter,
    Limits,
    RateLimit,
    RedisLimiter,
)
from fleetlens.serving.registry import ConfigWatcher
from fleetlens.serving.service import key_limits

EXAMPLES = Path(__file__).resolve().parent.parent / "serving" / "examples"
PASSWORD = "s3cret-limiter-pw"
UNIT = 60 * 10**6  # units per token in Redis (microsecond clock)


@dataclass
class RedisProcess:
    """A throw-away `redis-server`: loopback, a free port, no persistence, its own process group."""

    port: int
    log_path: Path
    password: str | None = PASSWORD
    process: subprocess.Popen[bytes] | None = None
    clients: list[redis.Redis] = field(default_factory=list)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A plain synchronous client (to look at the limiter's keys); closed when the server stops."""
        client = redis.Redis(port=self.port, password=self.password, socket_timeout=5)
        self.clients.append(client)
        return client

    def start(self, timeout_s: float = 20.0) -> RedisProcess:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not on PATH; the Redis rate-limiter tests need it. "
                        "Install it with scripts/setup-test-deps (Debian package: redis-server).", pytrace=False)
        command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.password:
            command += ["--requirepass", self.password]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def ready() -> bool:
            assert self.process.poll() is None, f"redis-server exited: {self.log_path.read_text()[-2000:]}"
            try:
                with redis.Redis(port=self.port, password=self.password, socket_timeout=5) as client:
                    return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(ready, timeout_s, interval_s=0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        for client in self.clients:
            client.close()
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)  # in case a test left it stopped
        stop_group(self.process, sig, 10.0)

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)


@pytest.fixture
def start_redis(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    """Factory: start redis-servers (a port may be reused to restart one); all stopped afterwards."""
    started: list[RedisProcess] = []

    def start(port: int | None = None, **kwargs: Any) -> RedisProcess:
        server = RedisProcess(port or free_port(), tmp_path / f"redis{len(started)}.log", **kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop(signal.SIGKILL)


@pytest.fixture
def redis_server(start_redis: Callable[..., RedisProcess]) -> RedisProcess:
    return start_redis()


def _limiter(server: RedisProcess, limits: Limits | Callable[[str], Limits], **kwargs: Any) -> RedisLimiter:
    limits_for = limits if callable(limits) else (lambda _key: limits)
    kwargs.setdefault("key_prefix", "test:rl:")
    return RedisLimiter(server.url, limits_for, **kwargs)


def _level(server: RedisProcess, key: str, field: str) -> float:
    return int(server.client().hget(key, field)) / UNIT


# --- the same arithmetic as InMemoryLimiter ------------------------------------------------


def test_decisions_match_the_in_memory_limiter(redis_server: RedisProcess) -> None:
    """A random run of checks and settlements gets the same decisions from Redis as from the
    in-memory limiter on a frozen clock. Refill is slow (3 tokens/min), so the little real time the
    run takes moves nothing by a whole token; waits differ by at most that time."""
    limits = Limits(requests=RateLimit(1, burst=10_000), tokens=RateLimit(3, burst=1000))
    memory = InMemoryLimiter(lambda _key: limits, clock=lambda: 500.0)
    shared = _limiter(redis_server, limits)
    rng = random.Random(7)

    async def run() -> int:
        started = time.monotonic()
        compared = 0
        for step in range(400):
            key = f"k{rng.randrange(3)}"
            estimate = rng.choice([0, 1, 5, 50, 200, 400, 999, 1000, 1001, 5000])
            want = memory.check_sync(key, tokens_estimate=estimate)
            got = await shared.check(key, tokens_estimate=estimate)
            where = f"step {step}: {key} estimate {estimate}"
            assert (got.allowed, got.limit_name, got.remaining, got.remaining_requests, got.remaining_tokens) == (
                want.allowed, want.limit_name, want.remaining, want.remaining_requests, want.remaining_tokens,
            ), where
            if want.retry_after_s is None:
                assert got.retry_after_s is None, where
            else:
                slack = time.monotonic() - started + 0.01
                assert want.retry_after_s - slack <= got.retry_after_s <= want.retry_after_s, where
            if want.allowed and rng.random() < 0.7:
                actual = rng.choice([0, estimate // 2, estimate, estimate + 30, 3000])
                memory.settle_sync(key, estimate, actual)
                await shared.settle(key, estimate, actual)
            compared += 1
        await shared.aclose()
        return compared

    assert asyncio.run(run()) == 400
    assert shared.errors_total == 0


def test_burst_then_429_with_retry_after(redis_server: RedisProcess) -> None:
    limiter = _limiter(redis_server, Limits(requests=RateLimit(6, burst=30), tokens=RateLimit(600)))

    async def run() -> None:
        decisions = [await limiter.check("k") for _ in range(30)]
        assert all(d.allowed for d in decisions) and decisions[0].remaining == 29 and decisions[-1].remaining == 0
        refused = await limiter.check("k", tokens_estimate=10)
        assert not refused.allowed and refused.limit_name == REQUESTS
        assert 8.0 < refused.retry_after_s <= 10.0  # one request at 6/min, less what refilled meanwhile
        status, body, headers = refused.error_response()
        assert status == 429 and headers["Retry-After"] in ("9", "10")
        assert body["error"]["type"] == "requests" and body["error"]["code"] == "rate_limit_exceeded"
        too_big = await limiter.check("other", tokens_estimate=601)
        assert not too_big.allowed and too_big.retry_after_s is None and too_big.limit_name == TOKENS
        assert (await limiter.check("other")).remaining_requests == 29  # the refused request charged nothing
        await limiter.aclose()

    asyncio.run(run())


def test_settle_refunds_and_charges_debt(redis_server: RedisProcess) -> None:
    limiter = _limiter(redis_server, Limits(tokens=RateLimit(600)))  # 10 tokens/s
    key = limiter.key("k")

    async def run() -> None:
        first = await limiter.check("k", tokens_estimate=500)
        assert first.allowed and first.remaining_tokens == 100
        refused = await limiter.check("k", tokens_estimate=500)
        assert not refused.allowed and refused.limit_name == TOKENS and 39 < refused.retry_after_s <= 40
        await limiter.settle("k", reserved=500, actual=50)  # 450 refunded
        assert (await limiter.check("k", tokens_estimate=500)).allowed
        await limiter.settle("k", reserved=500, actual=1100)  # 50 left, 600 more charged: 550 of debt
        assert -550 <= _level(redis_server, key, "t") <= -548
        refused = await limiter.check("k", tokens_estimate=10)
        assert not refused.allowed and 55.5 < refused.retry_after_s <= 56.0  # (550 debt + 10) at 10/s
        await limiter.settle("k", reserved=0, actual=10**7)  # floored at minus one capacity
        assert _level(redis_server, key, "t") == -600
        await limiter.settle("k", reserved=10**7, actual=0)  # refunds stop at the capacity
        assert not redis_server.client().exists(key)  # full again: the same as a key never seen
        await limiter.aclose()

    asyncio.run(run())


# --- one budget for several replicas -----------------------------------------------------


def test_two_limiters_share_one_budget_atomically(redis_server: RedisProcess) -> None:
    """Two limiter instances (two gateway replicas), each on its own thread and event loop, hammer
    one key concurrently: exactly the burst is admitted between them, never one more."""
    limits = Limits(requests=RateLimit(1, burst=50), tokens=RateLimit(1, burst=5000))
    replicas = [_limiter(redis_server, limits, max_connections=4, timeout_s=2.0) for _ in range(2)]
    admitted = [0, 0]

    def replica(index: int) -> None:
        async def run() -> None:
            decisions = await asyncio.gather(*(replicas[index].check("shared", tokens_estimate=10)
                                               for _ in range(80)))
            admitted[index] = sum(d.allowed for d in decisions)
            await replicas[index].aclose()

        asyncio.run(run())

    threads = [threading.Thread(target=replica, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(admitted) == 50 and all(admitted)
    assert sum(r.errors_total for r in replicas) == 0

    async def after() -> None:
        a, b = replicas
        # A settlement through one replica is what the other sees next.
        assert (await a.check("shared", tokens_estimate=0)).remaining_tokens is not None
        before = (await b.check("tokens-only", tokens_estimate=100)).remaining_tokens
        await a.settle("tokens-only", reserved=100, actual=1100)
        assert before == 4900 and (await b.check("tokens-only", tokens_estimate=0)).remaining_tokens == 3900
        other_prefix = _limiter(redis_server, limits, key_prefix="other:")  # another fleet: its own budget
        assert (await other_prefix.check("shared")).remaining_requests == 49
        for limiter in (a, b, other_prefix):
            await limiter.aclose()

    asyncio.run(after())


class Upstreams:
    """An OpenAI-shaped upstream: usage = words in the prompt + min(max_tokens, 5)."""

    def __init__(self) -> None:
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"])])

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        words = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        out = min(int(body.get("max_tokens") or 5), 5)
        return JSONResponse({"id": "x", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "t " * out},
                                          "finish_reason": "length"}],
                             "usage": {"prompt_tokens": words, "completion_tokens": out,
                                       "total_tokens": words + out}})


@dataclass
class Replica:
    gateway: Gateway
    client: httpx.AsyncClient
    spans: RecordedSpans

    async def post(self, key: str, max_tokens: int = 3) -> httpx.Response:
        body = {"model": "qwen-small", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi there"}]}
        return await self.client.post("/v1/chat/completions", content=json.dumps(body).encode(),
                                      headers={"content-type": "application/json", "authorization": f"Bearer {key}"})

    def roots(self) -> list[Any]:
        return [s for s in self.spans.get_finished_spans() if s.name == sc.ROOT_SPAN]

    async def aclose(self) -> None:
        await self.client.aclose()
        await self.gateway.aclose()
        await self.gateway.limiter.aclose()


def _replica(store: KeyStore, settings: GatewaySettings) -> Replica:
    """One in-process gateway with its limiter built as `fleetlens gateway` builds it."""
    watcher = ConfigWatcher(EXAMPLES / "models.yaml", EXAMPLES / "routes.yaml")
    exporter = RecordedSpans()
    provider = exporter.provider

    def pick(model: str) -> Upstream:
        return Upstream(f"{model}-0", f"http://{model}.upstream", lambda _ok: None)

    transport = httpx.ASGITransport(app=Upstreams().app)
    gateway = Gateway(lambda: watcher.config, lambda: store, key_limits(store, settings), pick,
                      provider.get_tracer("gw"), rng=random.Random(1), transport=transport)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway.app), base_url="http://gateway")
    return Replica(gateway, client, exporter)


@pytest.fixture
def keys() -> dict[str, Any]:
    tiny, tiny_hash = generate_key()
    metered, metered_hash = generate_key()
    store = KeyStore.from_entries([
        {"id": "tiny", "customer": "tiny-co", "hash": tiny_hash, "rpm": 3},
        {"id": "metered", "customer": "acme", "hash": metered_hash, "tpm": 60},
    ])
    return {"store": store, "tiny": tiny, "metered": metered}


def test_two_gateways_on_one_redis_enforce_the_combined_limit(redis_server: RedisProcess, keys: dict) -> None:
    settings = GatewaySettings(redis_url=redis_server.url, redis_key_prefix="gw:")
    assert isinstance(key_limits(keys["store"], settings), RedisLimiter)

    async def run() -> None:
        a, b = _replica(keys["store"], settings), _replica(keys["store"], settings)
        replies = []
        for replica in (a, b, a, b, a, b):
            replies.append(await replica.post(keys["tiny"]))
        assert [r.status_code for r in replies] == [200, 200, 200, 429, 429, 429]  # rpm 3 between both
        refused = replies[3]
        error = refused.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["retry-after"]) <= 20  # one request at 3/min
        for replica in (a, b):
            statuses = [root.attributes[sc.HTTP_STATUS_CODE] for root in replica.roots()]
            assert sorted(statuses) in ([200, 200, 429], [200, 429, 429])
            for root in replica.roots():
                assert root.attributes[sc.CUSTOMER] == "tiny-co"
                if root.attributes[sc.HTTP_STATUS_CODE] == 429:
                    assert root.attributes[sc.ERROR_TYPE] == "429"
            assert len([s for s in replica.spans.get_finished_spans() if s.name == "rate_limit"]) == 3
        # tokens: reserved at check (prompt estimate + max_tokens), settled to the usage (2 + 5)
        ok = await a.post(keys["metered"], max_tokens=40)
        assert ok.status_code == 200 and ok.json()["usage"]["total_tokens"] == 7
        assert 53 <= _level(redis_server, "gw:metered", "t") < 54.5  # 60 - 7, plus a second's refill at most
        for replica in (a, b):
            assert replica.gateway.limiter.errors_total == 0
            await replica.aclose()

    asyncio.run(run())


# --- keys in Redis ------------------------------------------------------------------------


def test_keys_are_prefixed_and_expire_when_full_again(redis_server: RedisProcess) -> None:
    limits = {"slow": Limits(requests=RateLimit(60)), "fast": Limits(requests=RateLimit(600)),
              "debt": Limits(tokens=RateLimit(600)), "free": Limits()}
    limiter = _limiter(redis_server, lambda key: limits[key], key_prefix="fleet-a:rl:")
    client = redis_server.client()

    async def run() -> None:
        for key in ("slow", "fast", "free"):
            assert (await limiter.check(key)).allowed
        assert sorted(client.keys("*")) == [b"fleet-a:rl:fast", b"fleet-a:rl:slow"]  # nothing for unlimited keys
        assert 0 < client.pttl("fleet-a:rl:slow") <= 1001  # one request at 1/s: full again within a second
        assert client.ttl("fleet-a:rl:slow") >= 0  # never a key without expiry
        wait_for(lambda: not client.exists("fleet-a:rl:fast"), timeout_s=5, interval_s=0.02)  # 100 ms
        assert (await limiter.check("fast")).remaining == 599  # gone = a fresh, full bucket
        await limiter.check("debt", tokens_estimate=100)
        await limiter.settle("debt", reserved=100, actual=700)  # -100: 70 s until full
        assert 68_000 < client.pttl("fleet-a:rl:debt") <= 70_001
        await limiter.settle("debt", reserved=10_000, actual=0)  # refunded to full: the key goes at once
        assert not client.exists("fleet-a:rl:debt")

    async def in_another_loop() -> None:
        assert (await limiter.check("slow")).allowed and limiter.errors_total == 0
        await limiter.aclose()

    asyncio.run(run())
    asyncio.run(in_another_loop())  # the limiter opens a client per event loop


# --- failure policy -----------------------------------------------------------------------


def test_fail_open_when_redis_is_killed(start_redis: Callable[..., RedisProcess], keys: dict,
                                        caplog: pytest.LogCaptureFixture) -> None:
    server = start_redis()
    caplog.set_level(logging.INFO, logger="fleetlens")
    settings = GatewaySettings(redis_url=server.url, redis_key_prefix="gw:")

    async def run() -> None:
        replica = _replica(keys["store"], settings)
        limiter = replica.gateway.limiter
        limiter._backoff_s = 0.0  # try Redis on every request in this test
        assert [(await replica.post(keys["tiny"])).status_code for _ in range(4)] == [200, 200, 200, 429]
        server.kill9()
        replies = [await replica.post(keys["tiny"]) for _ in range(5)]
        assert [r.status_code for r in replies] == [200] * 5  # served, without a limit check
        assert limiter.errors_total == 5
        metered = await replica.post(keys["metered"], max_tokens=40)  # its check and its settlement both fail
        assert metered.status_code == 200 and limiter.errors_total == 7
        statuses = [root.attributes[sc.HTTP_STATUS_CODE] for root in replica.roots()]
        assert statuses == [200, 200, 200, 429] + [200] * 6  # every request traced

        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "unavailable" in r.getMessage()]
        assert len(warnings) == 1  # logged once per interval, not once per request
        message = warnings[0].getMessage()
        assert "failing open" in message and f"127.0.0.1:{server.port}" in message and ":***@" in message
        assert PASSWORD not in caplog.text

        start_redis(port=server.port)  # Redis is back (empty): limits apply again
        assert [(await replica.post(keys["tiny"])).status_code for _ in range(4)] == [200, 200, 200, 429]
        assert limiter.errors_total == 7
        assert any("reachable again" in r.getMessage() for r in caplog.records)
        await replica.aclose()

    asyncio.run(run())


def test_hung_redis_fails_open_within_the_timeout_then_backs_off(redis_server: RedisProcess) -> None:
    limiter = _limiter(redis_server, Limits(requests=RateLimit(60)), timeout_s=0.2, backoff_s=30.0)

    async def run() -> None:
        assert (await limiter.check("k")).remaining == 59
        redis_server.process.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
        try:
            started = time.monotonic()
            decision = await limiter.check("k")
            took = time.monotonic() - started
            assert decision.allowed and decision.limit_name is None and limiter.errors_total == 1
            assert 0.15 < took < 1.0
            started = time.monotonic()
            assert (await limiter.check("k")).allowed  # backing off: Redis is not even tried
            assert time.monotonic() - started < 0.05 and limiter.errors_total == 2
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        limiter._down_until = -math.inf  # backoff over
        # 58, or 57: the timed-out EVALSHA sat in the socket buffer and Redis may run it on waking
        # (charging a request that was indeed served).
        assert (await limiter.check("k")).remaining in (57, 58)
        await limiter.aclose()

    asyncio.run(run())


def test_fail_closed_answers_503_in_openai_shape(redis_server: RedisProcess, keys: dict) -> None:
    settings = GatewaySettings(redis_url=redis_server.url, rate_limit_fail_open=False)

    async def run() -> None:
        replica = _replica(keys["store"], settings)
        assert (await replica.post(keys["tiny"])).status_code == 200
        redis_server.kill9()
        refused = await replica.post(keys["tiny"])
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json() == {"error": {
            "message": refused.json()["error"]["message"], "type": "server_error", "param": None,
            "code": "rate_limiter_unavailable"}}
        root = replica.roots()[-1]
        assert root.attributes[sc.HTTP_STATUS_CODE] == 503 and root.attributes[sc.ERROR_TYPE] == "503"
        assert root.status.status_code.name == "ERROR"
        assert replica.gateway.limiter.errors_total == 1
        await replica.aclose()

    asyncio.run(run())


# --- settings -----------------------------------------------------------------------------


def test_settings_pick_the_limiter_and_never_show_the_password() -> None:
    store = KeyStore.from_entries([])
    assert isinstance(key_limits(store), InMemoryLimiter)
    assert isinstance(key_limits(store, GatewaySettings()), InMemoryLimiter)
    url = f"redis://:{PASSWORD}@10.0.0.9:6380/2"
    limiter = key_limits(store, GatewaySettings(redis_url=url, redis_key_prefix="p:", rate_limit_fail_open=False))
    assert isinstance(limiter, RedisLimiter)  # nothing connects before the first check
    assert limiter.key_prefix == "p:" and not limiter.fail_open
    assert PASSWORD not in repr(limiter) and limiter.url == "redis://:***@10.0.0.9:6380/2"
    with pytest.raises(ValidationError):
        GatewaySettings(redis_url=f"http://:{PASSWORD}@host:6379")


def test_a_bad_redis_url_setting_is_refused_without_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETLENS_GATEWAY__REDIS_URL", f"http://:{PASSWORD}@host:6379")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "gateway.redis_url" in str(caught.value) and "redis://" in str(caught.value)
    assert PASSWORD not in str(caught.value)
    monkeypatch.setenv("FLEETLENS_GATEWAY__REDIS_URL", f"redis://:{PASSWORD}@host:6379/0")
    monkeypatch.setenv("FLEETLENS_GATEWAY__RATE_LIMIT_FAIL_OPEN", "false")
    gateway = load_settings().gateway
    assert gateway.redis_url.endswith("@host:6379/0") and not gateway.rate_limit_fail_open
    assert gateway.redis_key_prefix == "fleetlens:ratelimit:"
