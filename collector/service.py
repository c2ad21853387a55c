"""`fleetlens collector`: receivers → spool → writer, plus the vLLM metrics scraper, in one process.

Shutdown on SIGTERM/SIGINT: the receivers stop taking requests (new ones get a retryable
answer), the writer gets `drain_timeout_s` to empty the spool into the warehouse, and whatever is
left stays in the spool for the next start. Nothing acknowledged depends on a clean shutdown: a
`kill -9` leaves the same spool behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry

from fleetlens.config import Settings
from fleetlens.net import is_loopback

from .receivers import GrpcReceiver, HttpReceiver, Intake, start_grpc
from .spool import Spool
from .telemetry import PipelineMetrics, ReceiverStats
from .writer import Writer

log = logging.getLogger("fleetlens.collector")


class _QuietServer(uvicorn.Server):
    """uvicorn inside our loop: signals are ours, not uvicorn's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Collector:
    """The assembled pipeline; `await run()` until `stop()`."""

    def __init__(self, settings: Settings, *, writer_workers: int = 2, drain_timeout_s: float = 10.0) -> None:
        config = settings.collector
        self.settings = settings
        self.config = config
        self.drain_timeout_s = drain_timeout_s
        self.spool = Spool(settings.spool_path, max_bytes=config.spool_max_bytes,
                           queue_max_bytes=config.queue_max_bytes, segment_bytes=config.spool_segment_bytes,
                           full_policy=config.spool_full_policy)
        self.writer = Writer(self.spool, settings.warehouse, workers=writer_workers,
                             batch_max_spans=config.batch_max_spans, batch_timeout_s=config.batch_timeout_s,
                             retry_initial_s=config.retry_initial_s, retry_max_s=config.retry_max_s)
        self.receiver_stats = ReceiverStats()
        self.intake = Intake(self.spool, self.receiver_stats, max_request_bytes=config.max_request_bytes,
                             max_attribute_value_bytes=config.max_attribute_value_bytes,
                             max_concurrent_requests=config.max_concurrent_requests,
                             memory_limit_bytes=config.memory_limit_bytes)
        self.scraper: Any = None
        self.registry = CollectorRegistry(auto_describe=False)
        self._stopped = asyncio.Event()

    def stop(self) -> None:
        self._stopped.set()

    async def run(self) -> None:
        config = self.config
        self.writer.start()
        self.scraper = self._make_scraper()
        self.registry.register(PipelineMetrics(self.receiver_stats, self.spool, self.writer, self.scraper))
        http = _QuietServer(uvicorn.Config(
            HttpReceiver(self.intake, self.registry).app, host=config.host, port=config.http_port,
            log_level="warning", access_log=False, lifespan="off", timeout_keep_alive=30,
        ))
        http_task = asyncio.create_task(http.serve(), name="otlp-http")
        grpc_server = None
        if config.grpc_port:
            grpc_server = await start_grpc(GrpcReceiver(self.intake), config.host, config.grpc_port,
                                           config.max_request_bytes)
        scrape_task = asyncio.create_task(self.scraper.run(), name="scraper") if self.scraper else None
        while not http.started and not http_task.done():
            await asyncio.sleep(0.01)
        if http_task.done():
            http_task.result()  # raises the bind error
            raise OSError(f"OTLP/HTTP receiver on {config.host}:{config.http_port} stopped at start")
        log.info("collector ready: OTLP/gRPC %s:%s, OTLP/HTTP %s:%s, spool %s, warehouse %s",
                 config.host, config.grpc_port or "off", config.host, config.http_port,
                 self.spool.path, self.settings.warehouse.redacted())
        try:
            await self._stopped.wait()
        finally:
            await self._shutdown(http, http_task, grpc_server, scrape_task)

    async def _shutdown(self, http: uvicorn.Server, http_task: asyncio.Task[None], grpc_server: Any,
                        scrape_task: asyncio.Task[None] | None) -> None:
        log.info("collector stopping: refusing new data, draining the spool")
        self.intake.stopping = True
        if grpc_server is not None:
            await grpc_server.stop(grace=2.0)
        http.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(http_task, timeout=5.0)
        if scrape_task is not None:
            scrape_task.cancel()
            with contextlib.suppress(BaseException):
                await scrape_task
        drained = await asyncio.to_thread(self.spool.wait_drained, self.drain_timeout_s)
        self.writer.stop()
        self.spool.close()
        if drained:
            log.info("collector stopped; spool empty")
        else:
            log.warning("collector stopped; %d spool bytes kept for the next start", self.spool.size_bytes)

    def _make_scraper(self) -> Any:
        if not self.config.scrape_targets and not self.config.scrape_registered:
            return None
        from .scrape import build_scraper

        return build_scraper(self.settings)


def check_bind_policy(settings: Settings) -> None:
    host = settings.collector.host
    if not is_loopback(host):
        log.warning("collector listens on %s: OTLP receivers have no authentication; "
                    "keep them on a private network", host)


def run(settings: Settings, *, writer_workers: int = 2) -> None:
    """Run the collector in the foreground until SIGTERM/SIGINT."""
    check_bind_policy(settings)

    async def main() -> None:
        collector = Collector(settings, writer_workers=writer_workers)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, collector.stop)
        await collector.run()

    asyncio.run(main())
