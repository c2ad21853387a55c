"""Shared fixtures: real embedded warehouse servers, started as the user starts them (the CLI)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import clickhouse_connect
import pytest

from fleetlens.config import WarehouseURL
from fleetlens.warehouse.client import WarehouseUnavailable, wait_until_ready

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class WarehouseProcess:
    """A `fleetlens warehouse serve` child process on a private data path and port."""

    path: Path
    port: int
    password: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> "WarehouseProcess":
        env = {**os.environ, **self.env}
        if self.password:
            env["FLEETLENS_WAREHOUSE_SERVER__PASSWORD"] = self.password
        self.log_path = self.path.with_suffix(".log")
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fleetlens", "warehouse", "serve", "--path", str(self.path),
             "--port", str(self.port), "--log-level", "warning"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        log.close()
        try:
            wait_until_ready(WarehouseURL.parse(self.url), timeout_s, alive=lambda: self.process.poll() is None)
        except WarehouseUnavailable as error:
            raise RuntimeError(f"{error}: {self.log_path.read_text()[-2000:]}") from None
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        os.killpg(self.process.pid, sig)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait()

    def kill9(self) -> None:
        self.stop(signal.SIGKILL)

    def client(self, **kwargs: object) -> clickhouse_connect.driver.client.Client:
        if self.password and "password" not in kwargs:
            kwargs["password"] = self.password
        return clickhouse_connect.get_client(host="127.0.0.1", port=self.port, **kwargs)


@pytest.fixture
def start_warehouse(tmp_path: Path) -> Iterator[Callable[..., WarehouseProcess]]:
    """Factory: start one or more warehouses under this test's tmp_path; all stopped afterwards."""
    started: list[WarehouseProcess] = []

    def start(path: Path | None = None, port: int | None = None, **kwargs: object) -> WarehouseProcess:
        wh = WarehouseProcess(path or tmp_path / f"wh{len(started)}", port or free_port(), **kwargs)
        started.append(wh)
        return wh.start()

    yield start
    for wh in started:
        wh.stop()


@pytest.fixture(scope="session")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarehouseProcess]:
    """One embedded warehouse shared by the tests that only need a server."""
    wh = WarehouseProcess(tmp_path_factory.mktemp("shared") / "warehouse", free_port()).start()
    yield wh
    wh.stop()
