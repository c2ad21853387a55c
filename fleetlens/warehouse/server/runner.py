"""Start and stop the embedded ClickHouse server.

uvicorn owns the sockets and signals: on SIGTERM/SIGINT it stops accepting connections and
lets in-flight requests finish (up to `graceful_shutdown_s`), then the engine is closed. An
INSERT answered 200 has its parts written by the engine before the answer, so it survives a
`kill -9` of this process.
"""

from __future__ import annotations

import logging
import signal
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import uvicorn

from ...config import WarehouseServerSettings
from ...net import is_loopback
from .app import WarehouseApp
from .engine import Engine

log = logging.getLogger("fleetlens.warehouse")


class BindPolicyError(ValueError):
    """Binding a non-loopback address without a password is refused."""


def check_bind_policy(config: WarehouseServerSettings) -> None:
    if not is_loopback(config.host) and not (config.password and config.password.get_secret_value()):
        raise BindPolicyError(
            f"refusing to listen on {config.host}: a non-loopback address needs a password "
            "(set FLEETLENS_WAREHOUSE_SERVER__PASSWORD or warehouse_server.password)"
        )


def build_app(path: Path, config: WarehouseServerSettings) -> WarehouseApp:
    engine = Engine(path, session_timeout_s=config.session_timeout_s, session_lock_wait_s=config.session_lock_wait_s)
    server = WarehouseApp(engine, config)

    @asynccontextmanager
    async def lifespan(_app: object) -> AsyncIterator[None]:
        log.info("warehouse ready: chDB %s at %s", engine.version, path)
        try:
            yield
        finally:
            engine.close()
            log.info("warehouse stopped")

    server.app.router.lifespan_context = lifespan
    return server


def serve(path: Path, config: WarehouseServerSettings, *, log_level: str = "info") -> None:
    """Run the server in the foreground until SIGTERM/SIGINT."""
    check_bind_policy(config)
    server = build_app(path, config)
    uvicorn_config = uvicorn.Config(
        server.app,
        host=config.host,
        port=config.port,
        log_level=log_level,
        access_log=False,  # URLs may carry credentials (user/password params): never log them
        timeout_graceful_shutdown=int(config.graceful_shutdown_s),
        timeout_keep_alive=30,
        lifespan="on",
        h11_max_incomplete_event_size=1024 * 1024,
    )
    # uvicorn re-raises the signal it caught once shutdown is done; with these no-op handlers in
    # place (restored by uvicorn afterwards) a clean SIGTERM/SIGINT shutdown exits 0, not 143.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    uvicorn.Server(uvicorn_config).run()
