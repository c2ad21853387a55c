"""wait_until_ready: ready as soon as /ping answers; fails fast when the server process has died."""

from __future__ import annotations

import time

import pytest

from conftest import free_port
from fleetlens.config import WarehouseURL
from fleetlens.warehouse.client import WarehouseUnavailable, wait_until_ready


def test_ready_when_ping_answers(warehouse):
    wait_until_ready(WarehouseURL.parse(warehouse.url), timeout_s=5, alive=lambda: True)


def test_dead_process_fails_fast_not_at_timeout():
    started = time.monotonic()
    with pytest.raises(WarehouseUnavailable, match="exited before answering"):
        wait_until_ready(WarehouseURL.parse(f"http://127.0.0.1:{free_port()}"), timeout_s=60, alive=lambda: False)
    assert time.monotonic() - started < 5


def test_nothing_listening_times_out():
    with pytest.raises(WarehouseUnavailable, match="did not answer /ping within 1 s"):
        wait_until_ready(WarehouseURL.parse(f"http://127.0.0.1:{free_port()}"), timeout_s=1)
