"""The dashboard's one door to ClickHouse: the marts dbt builds and the raw `otel_traces`.

SQL names tables as `$marts.table` / `$raw.table`; the databases come from FleetLens' settings
(`{database}_marts` beside the collector's `{database}`), quoted here. Values always travel as
bind parameters (see `filters`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from string import Template
from typing import Any

import pandas as pd
from clickhouse_connect.driver.client import Client

from fleetlens.config import Settings
from fleetlens.transform import models_database
from fleetlens.warehouse.client import connect, missing_tables


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


@dataclass
class Freshness:
    """How new the data behind a page is."""

    newest_request: datetime | None
    marts_built: datetime | None

    @property
    def empty(self) -> bool:
        return self.newest_request is None


@dataclass
class DashboardWarehouse:
    client: Client
    raw: str
    marts: str

    @classmethod
    def from_settings(cls, settings: Settings) -> DashboardWarehouse:
        url = settings.warehouse
        # Dashboards read; a long query must not tie up a page forever.
        client = connect(url, send_receive_timeout=60)
        return cls(client=client, raw=url.database, marts=models_database(url))

    def sql(self, template: str) -> str:
        return Template(template).substitute(raw=quote_identifier(self.raw), marts=quote_identifier(self.marts))

    def frame(self, template: str, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """The result as a DataFrame — with its columns even when it has no rows (ClickHouse sends
        no header for an empty Native result; DESCRIBE of the same query names them)."""
        sql, params = self.sql(template), params or {}
        frame = self.client.query_df(sql, parameters=params, use_extended_dtypes=False)
        if frame.empty and not len(frame.columns):
            names = [row[0] for row in self.client.query(f"DESCRIBE ({sql})", parameters=params).result_rows]
            frame = pd.DataFrame(columns=names)
        return frame

    def rows(self, template: str, params: dict[str, Any] | None = None) -> list[tuple]:
        return self.client.query(self.sql(template), parameters=params or {}).result_rows

    def has_table(self, database: str, table: str) -> bool:
        """Asked each time (cheap), not remembered: the marts may be built after the app started."""
        return not missing_tables(self.client, database, (table,))

    def freshness(self) -> Freshness:
        """Newest request in fct_requests and when dbt last wrote it; `empty` when there is none."""
        if not self.has_table(self.marts, "fct_requests"):
            return Freshness(None, None)
        newest = self.rows("SELECT max(requested_at), count() > 0 FROM $marts.fct_requests")[0]
        built = self.rows(
            "SELECT max(modification_time) FROM system.parts "
            "WHERE database = {db:String} AND table = 'fct_requests' AND active",
            {"db": self.marts})[0][0]
        return Freshness(newest[0] if newest[1] else None, built)
