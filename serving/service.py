"""`fleetlens gateway`: the gateway assembled from its files and run under uvicorn.

models.yaml + routes.yaml are watched and swapped as a pair when both are valid (a bad edit is
logged and the running configuration stays); replica pools follow the registry; health checks
run in the background; spans go to the collector in batches and are never waited for.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import gc
import importlib
import logging
import random
from collections.abc import AsyncIterator

import anyio
import uvicorn

from fleetlens.config import ConfigError, GatewaySettings, Settings
from fleetlens.net import is_loopback

from .gateway import Gateway, Upstream, UpstreamPicker
from .keys import KeyStore, KeysWatcher
from .pool import HealthChecker, Pools
from .ratelimit import InMemoryLimiter, Limiter, Limits, RedisLimiter
from .registration import ReplicaDirectory, sync_pools
from .redaction import load_redactor
from .registry import ConfigWatcher
from .tracing import LoopSpanProcessor, loop_tracer_provider

log = logging.getLogger("fleetlens.gateway")


def pool_picker(pools: Pools) -> UpstreamPicker:
    """Least-outstanding choice among a model's healthy replicas; the request counts as in flight
    until the gateway reports how it went (for a stream: when the stream ends)."""

    def pick(model: str) -> Upstream | None:
        pool = pools.get(model)
        replica = pool.pick() if pool is not None else None
        if pool is None or replica is None:
            return None
        replica.outstanding += 1
        replica.requests_total += 1

        def done(ok: bool) -> None:
            replica.outstanding -= 1
            pool.report(replica, ok)

        return Upstream(replica.name, replica.url, done)

    return pick


def key_limits(store: KeyStore, config: GatewaySettings | None = None) -> Limiter:
    """Per-key limits from the KeyStore, kept in Redis when `gateway.redis_url` is set (shared by
    every replica), else in this process."""

    def limits_for(key_id: str) -> Limits:
        key = store.get(key_id)
        return Limits.per_minute(key.rpm if key else None, key.tpm if key else None)

    if config is None or not config.redis_url:
        return InMemoryLimiter(limits_for)
    limiter = RedisLimiter(config.redis_url, limits_for, key_prefix=config.redis_key_prefix,
                           fail_open=config.rate_limit_fail_open, timeout_s=config.redis_timeout_s)
    log.info("rate limits shared through %s (fail %s)", limiter.url,
             "open" if config.rate_limit_fail_open else "closed")
    return limiter


def build(settings: Settings) -> tuple[Gateway, ConfigWatcher, Pools, HealthChecker, LoopSpanProcessor]:
    """Everything the gateway needs, from settings; raises ConfigError on a bad file."""
    config = settings.gateway
    watcher = ConfigWatcher(config.models_file, config.routes_file)
    store = KeyStore.from_yaml(config.keys_file)
    pools = Pools(watcher.config.registry, watcher.config.routes.pool)
    endpoint = config.otlp_endpoint or f"http://127.0.0.1:{settings.collector.http_port}"
    redact = load_redactor(config.redaction_hook)
    provider, spans = loop_tracer_provider(endpoint)
    gateway = Gateway(lambda: watcher.config, lambda: store, key_limits(store, config), pool_picker(pools),
                      provider.get_tracer("fleetlens.gateway"), record_content=config.record_content,
                      connect_timeout_s=config.connect_timeout_s, rng=random.Random())
    gateway.redact = redact
    gateway.observe(pools.snapshot, spans.stats)
    gateway.keys_watcher = KeysWatcher(config.keys_file, store)  # reloaded in place by _reload
    return gateway, watcher, pools, HealthChecker(pools), spans


def run(settings: Settings) -> None:
    """Serve until SIGTERM/SIGINT."""
    config = settings.gateway
    if not is_loopback(config.host):
        log.warning("gateway listens on %s: API keys are checked, but use TLS in front of it", config.host)
    gateway, watcher, pools, checker, spans = build(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: object) -> AsyncIterator[None]:
        await spans.start()
        checker.start()
        reload_task = asyncio.create_task(_reload(watcher, pools, config.reload_interval_s, gateway.keys_watcher))
        replicas_task = asyncio.create_task(_follow_replicas(ReplicaDirectory(settings.replicas_path), pools))
        await _settle_heap()
        try:
            yield
        finally:
            reload_task.cancel()
            replicas_task.cancel()
            await checker.stop()
            await gateway.aclose()
            await spans.aclose()

    gateway.app.router.lifespan_context = lifespan
    uvicorn.run(gateway.app, host=config.host, port=config.port, log_level="warning", access_log=False)


async def _settle_heap() -> None:
    """Take everything built at start-up out of the cyclic GC's walks (gc.freeze), once what the
    request path would otherwise load on first use is loaded too.

    The modules and objects loaded before serving (Starlette, OpenTelemetry, pydantic, the
    registry) never become garbage, yet every full collection walked them all: 40-60 ms pauses of
    the event loop every few seconds at 50 concurrent streams (bench/gateway_overhead.py). And what
    the first requests imported stayed young and was walked by every full collection after — ~120
    modules (with the SDK's OTLP encoder, since replaced), 20-45 ms each time. What they still load
    on first use is loaded here: anyio's asyncio backend (streaming responses), the IDNA codec (the
    first upstream URL), httpcore (the health checks). Warmed and then frozen, a full pass walks
    only what requests leave behind (a few ms)."""
    await anyio.sleep(0)  # loads anyio's backend for this loop
    codecs.lookup("idna")
    importlib.import_module("httpcore")
    gc.collect()
    gc.freeze()


async def _reload(watcher: ConfigWatcher, pools: Pools, interval_s: float,
                  keys: KeysWatcher | None = None) -> None:
    while True:
        await asyncio.sleep(interval_s)
        if keys is not None:
            keys.check()  # a bad keys.yaml is logged and the old keys stay
        try:
            if watcher.check():
                pools.update(watcher.config.registry, watcher.config.routes.pool)
                log.info("configuration reloaded")
        except ConfigError as error:  # check() keeps the old config; this is belt and braces
            log.error("%s", error)


async def _follow_replicas(directory: ReplicaDirectory, pools: Pools, interval_s: float = 1.0) -> None:
    """Keep the pools' launched replicas in step with the replica directory (`fleetlens serve replica`)."""
    while True:
        try:
            records = await asyncio.to_thread(directory.records)
            sync_pools(pools, records)
        except Exception:  # noqa: BLE001 - a bad record must not stop the loop that serves good ones
            log.exception("reading the replica directory %s failed", directory.path)
        await asyncio.sleep(interval_s)
