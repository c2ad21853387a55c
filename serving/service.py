"""`fleetlens gateway`: the gateway assembled from its files and run under uvicorn.

models.yaml + routes.yaml are watched and swapped as a pair when both are valid (a bad edit is
logged and the running configuration stays); replica pools follow the registry; health checks
run in the background; spans go to the collector in batches and are never waited for.

With `gateway.workers` > 1, uvicorn's supervisor runs that many gateway processes on one port
(each builds its own gateway from the same settings, handed over in the environment); rate limits
are then shared through Redis, and each worker's counters are merged on /metrics (workers.py).
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import gc
import importlib
import json
import logging
import os
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

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
from .workers import WorkerStats

WORKER_SETTINGS_ENV = "FLEETLENS_GATEWAY_WORKER_SETTINGS"  # what each worker process builds its gateway from
WORKER_LOG_LEVEL_ENV = "FLEETLENS_GATEWAY_WORKER_LOG_LEVEL"
WORKERS_DIR_ENV = "FLEETLENS_GATEWAY_WORKERS_DIR"  # where workers leave their counters for /metrics

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


def shared_limits_check(config: GatewaySettings) -> Callable[[KeyStore], None] | None:
    """For several workers without Redis: refuse keys with rpm/tpm limits, which each worker would
    enforce on its own share of the traffic (N workers, up to N times the limit)."""
    if config.workers == 1 or config.redis_url:
        return None

    def check(store: KeyStore) -> None:
        limited = store.limited_ids()
        if limited:
            raise ConfigError(
                f"keys {', '.join(map(repr, limited[:5]))} have rpm/tpm limits, and gateway.workers is "
                f"{config.workers}: limits shared by several workers need gateway.redis_url (or run one worker)")

    return check


def build(settings: Settings) -> tuple[Gateway, ConfigWatcher, Pools, HealthChecker, LoopSpanProcessor]:
    """Everything the gateway needs, from settings; raises ConfigError on a bad file."""
    config = settings.gateway
    watcher = ConfigWatcher(config.models_file, config.routes_file)
    store = KeyStore.from_yaml(config.keys_file)
    check_keys = shared_limits_check(config)
    if check_keys is not None:
        check_keys(store)
    pools = Pools(watcher.config.registry, watcher.config.routes.pool)
    endpoint = config.otlp_endpoint or f"http://127.0.0.1:{settings.collector.http_port}"
    redact = load_redactor(config.redaction_hook)
    provider, spans = loop_tracer_provider(endpoint)
    gateway = Gateway(lambda: watcher.config, lambda: store, key_limits(store, config), pool_picker(pools),
                      provider.get_tracer("fleetlens.gateway"), record_content=config.record_content,
                      connect_timeout_s=config.connect_timeout_s, rng=random.Random())
    gateway.redact = redact
    gateway.observe(pools.snapshot, spans.stats)
    gateway.keys_watcher = KeysWatcher(config.keys_file, store, check_keys)  # reloaded in place by _reload
    return gateway, watcher, pools, HealthChecker(pools), spans


def create_app(settings: Settings, workers_dir: Path | None = None) -> Any:
    """The gateway's ASGI app, with a lifespan that starts and stops what runs beside requests."""
    config = settings.gateway
    gateway, watcher, pools, checker, spans = build(settings)
    worker_stats = WorkerStats(workers_dir, gateway.metrics) if workers_dir is not None else None

    @contextlib.asynccontextmanager
    async def lifespan(_app: object) -> AsyncIterator[None]:
        await spans.start()
        checker.start()
        tasks = [asyncio.create_task(_reload(watcher, pools, config.reload_interval_s, gateway.keys_watcher)),
                 asyncio.create_task(_follow_replicas(ReplicaDirectory(settings.replicas_path), pools))]
        if worker_stats is not None:
            tasks.append(asyncio.create_task(worker_stats.publish_forever()))
        await _settle_heap()
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            if worker_stats is not None:
                worker_stats.retire()
            await checker.stop()
            await gateway.aclose()
            await spans.aclose()

    gateway.app.router.lifespan_context = lifespan
    return gateway.app


def run(settings: Settings, log_level: str = "info") -> None:
    """Serve until SIGTERM/SIGINT: in this process, or in `gateway.workers` processes on one port."""
    config = settings.gateway
    if not is_loopback(config.host):
        log.warning("gateway listens on %s: API keys are checked, but use TLS in front of it", config.host)
    if config.workers == 1:
        uvicorn.run(create_app(settings), host=config.host, port=config.port, log_level="warning", access_log=False)
        return
    build(settings)  # a bad file or key is reported once, here, before any worker starts
    workers_dir = Path(tempfile.mkdtemp(prefix="fleetlens-gateway-workers-"))
    handed_over = settings.model_dump(mode="json", include={"data_dir", "collector", "replica", "gateway"})
    os.environ.update({WORKER_SETTINGS_ENV: json.dumps(handed_over), WORKER_LOG_LEVEL_ENV: log_level.upper(),
                       WORKERS_DIR_ENV: str(workers_dir)})
    log.info("gateway: %d workers on %s:%d", config.workers, config.host, config.port)
    try:
        uvicorn.run(f"{__name__}:worker_app", factory=True, workers=config.workers, host=config.host,
                    port=config.port, log_level="warning", access_log=False)
    finally:
        shutil.rmtree(workers_dir, ignore_errors=True)


def configure_logging(level: str) -> None:
    """The gateway's log format, in `fleetlens gateway` and in each worker it spawns."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per replica health check


def worker_app() -> Any:
    """One worker's app (uvicorn's factory, in a process it spawned): built from the settings the
    supervisor handed over."""
    configure_logging(os.environ.get(WORKER_LOG_LEVEL_ENV, "INFO"))
    settings = Settings.model_validate(json.loads(os.environ[WORKER_SETTINGS_ENV]))
    return create_app(settings, Path(os.environ[WORKERS_DIR_ENV]))


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
