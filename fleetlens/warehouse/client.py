"""Clients for the warehouse URL: the one way FleetLens code reaches ClickHouse."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import clickhouse_connect
import httpx
from clickhouse_connect.driver.client import Client

from ..config import WarehouseURL
from ..net import wait_http


class WarehouseUnavailable(RuntimeError):
    """The warehouse did not answer; the message says where FleetLens looked."""


def connect(url: WarehouseURL, *, database: str | None = None, **kwargs: Any) -> Client:
    """A clickhouse-connect client for `url` (its database unless `database` overrides it)."""
    try:
        return clickhouse_connect.get_client(
            host=url.host,
            port=url.port,
            username=url.username,
            password=url.password.get_secret_value(),
            database=url.database if database is None else database,
            secure=url.secure,
            compress=kwargs.pop("compress", "lz4"),
            **kwargs,
        )
    except Exception as error:
        raise WarehouseUnavailable(f"cannot reach the warehouse at {url.redacted()}: {error}") from error


def missing_tables(client: Client, database: str, tables: Iterable[str]) -> list[str]:
    """Which of `tables` `database` lacks, in the order given (one query to system.tables)."""
    present = {row[0] for row in client.query(
        "SELECT name FROM system.tables WHERE database = {db:String}", parameters={"db": database}).result_rows}
    return [table for table in tables if table not in present]


def ping(url: WarehouseURL, timeout_s: float = 2.0) -> bool:
    try:
        response = httpx.get(f"{url.scheme}://{url.host}:{url.port}/ping", timeout=timeout_s)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def wait_until_ready(url: WarehouseURL, timeout_s: float = 30.0, *, alive: Callable[[], bool] | None = None) -> None:
    """Block until `url` answers /ping. With `alive` (the server process we started), stop
    waiting as soon as it has died instead of running out the whole timeout."""
    if wait_http(f"{url.scheme}://{url.host}:{url.port}/ping", timeout_s, alive=alive):
        return
    if alive is not None and not alive():
        raise WarehouseUnavailable(f"the warehouse at {url.redacted()} exited before answering /ping")
    raise WarehouseUnavailable(f"the warehouse at {url.redacted()} did not answer /ping within {timeout_s:.0f} s")
