"""Data retention in the warehouse: drop expired partitions now, and keep a table TTL so the engine
goes on expiring data between runs (and on a warehouse where the DAG does not run).

Both halves are needed. A TTL set after data was loaded only expires parts when ClickHouse merges
them, which may be never for cold partitions; `DROP PARTITION` frees the disk at once but only as
often as something runs it. Tables are created with `ttl_only_drop_parts = 1`, so the engine, like
this module, removes whole partitions and never rewrites parts to delete single rows.

Which partitions are expired comes from `system.parts` (the min/max index of the partition key's
column kept for every part), not from scanning the data: one partition is dropped when its newest
row is older than the cutoff. That is only sound when the table is partitioned by an expression of
the configured time column, so a table whose partition key does not mention it is refused.

Every step is idempotent: a second run finds nothing to drop and the TTL already in place.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from clickhouse_connect.driver.client import Client

from .config import RAW_TABLE_RETENTION, Settings, load_settings
from .transform import models_database
from .warehouse.server.sql import quote_identifier

log = logging.getLogger("fleetlens.retention")

# ALTER ... MODIFY TTL would otherwise rewrite every part at once (a mutation); the partitions this
# module drops are the only ones that need work, the rest expire as the engine merges.
_TTL_ALTER_SETTINGS = {"materialize_ttl_after_modify": 0}


@dataclass(frozen=True)
class RetentionRule:
    """Keep `days` days of `database.table`, judged by `time_column`; 0 days keeps everything."""

    database: str
    table: str
    time_column: str
    days: int

    @property
    def qualified(self) -> str:
        return f"{quote_identifier(self.database)}.{quote_identifier(self.table)}"

    @property
    def ttl_expression(self) -> str:
        """The TTL clause body, as the schema migrations render it (`fleetlens.schema.migrate`)."""
        return f"toDateTime({self.time_column}) + toIntervalDay({self.days})"

    def cutoff(self, now: datetime) -> datetime:
        return now.astimezone(timezone.utc) - timedelta(days=self.days)

    def as_dict(self) -> dict[str, Any]:
        """A plain dict, as Airflow passes a rule between tasks (XCom is JSON)."""
        return {"database": self.database, "table": self.table, "time_column": self.time_column, "days": self.days}


@dataclass
class RetentionResult:
    """What one run did to one table, for the task log and for tests."""

    rule: RetentionRule
    dropped_partitions: list[str] = field(default_factory=list)
    ttl_action: str = "unchanged"  # "set", "removed", "unchanged", "table missing"

    def summary(self) -> str:
        kept = f"keep {self.rule.days} d" if self.rule.days else "keep forever"
        dropped = ", ".join(self.dropped_partitions) or "none"
        return f"{self.rule.database}.{self.rule.table} ({kept}): dropped partitions: {dropped}; TTL {self.ttl_action}"


class RetentionError(RuntimeError):
    """A table cannot be expired safely as configured; the message says which and why."""


def retention_rules(settings: Settings) -> list[RetentionRule]:
    """Every table whose retention is configured: the collector's three (`traces_ttl_days`,
    `metrics_ttl_days`) and `retention.tables`, with their databases resolved."""
    raw = settings.warehouse.database
    rules = [RetentionRule(raw, table, column, getattr(settings, days_setting))
             for table, (column, days_setting) in RAW_TABLE_RETENTION.items()]
    databases = {"raw": raw, "models": models_database(settings.warehouse)}
    for table, rule in settings.retention.tables.items():
        rules.append(RetentionRule(databases.get(rule.database, rule.database), table, rule.time_column, rule.days))
    return rules


def enforce(client: Client, rule: RetentionRule, now: datetime) -> RetentionResult:
    """Apply `rule` to its table: drop the partitions entirely older than `now - days` and make the
    table's TTL match (set it, or remove it when days is 0). A missing table is reported, not an
    error: the dbt models appear only after their first build."""
    result = RetentionResult(rule)
    table = _describe(client, rule)
    if table is None:
        result.ttl_action = "table missing"
        log.info("retention: %s.%s does not exist (yet); nothing to do", rule.database, rule.table)
        return result
    engine_full, partition_key = table
    if "MergeTree" not in engine_full:
        raise RetentionError(f"{rule.database}.{rule.table} is not a MergeTree table ({engine_full.split(' ')[0]}); "
                             "only partitioned tables can be expired (a dbt view needs no retention)")
    if rule.days:
        if not re.search(rf"\b{re.escape(rule.time_column)}\b", partition_key):
            raise RetentionError(
                f"{rule.database}.{rule.table} is partitioned by {partition_key or 'nothing'!r}, not by "
                f"{rule.time_column}: its partitions cannot be expired by {rule.time_column}")
        for partition_id, partition in expired_partitions(client, rule, rule.cutoff(now)):
            client.command(f"ALTER TABLE {rule.qualified} DROP PARTITION ID %(id)s", parameters={"id": partition_id})
            result.dropped_partitions.append(partition)
    result.ttl_action = _sync_ttl(client, rule, engine_full)
    log.info("retention: %s", result.summary())
    return result


def expired_partitions(client: Client, rule: RetentionRule, cutoff: datetime) -> list[tuple[str, str]]:
    """(partition id, partition value) of every partition of the table whose newest row is older
    than `cutoff`, oldest first, read from the parts' min/max index (no data scan). Date columns
    keep their range in max_date, DateTime ones in max_time; a part with neither (1970) is kept."""
    rows = client.query(
        "SELECT partition_id, any(partition) AS value,"
        " max(greatest(max_time, toDateTime(max_date, 'UTC'))) AS newest"
        " FROM system.parts WHERE database = %(db)s AND table = %(table)s AND active"
        " GROUP BY partition_id"
        " HAVING newest > toDateTime(0, 'UTC') AND newest < toDateTime(%(cutoff)s, 'UTC')"
        " ORDER BY newest",
        parameters={"db": rule.database, "table": rule.table,
                    "cutoff": cutoff.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")},
    ).result_rows
    return [(partition_id, value) for partition_id, value, _ in rows]


def _describe(client: Client, rule: RetentionRule) -> tuple[str, str] | None:
    rows = client.query(
        "SELECT engine_full, partition_key FROM system.tables WHERE database = %(db)s AND name = %(table)s",
        parameters={"db": rule.database, "table": rule.table},
    ).result_rows
    return (rows[0][0], rows[0][1]) if rows else None


def _current_ttl(engine_full: str) -> str | None:
    """The table TTL in `engine_full` (`... TTL expr SETTINGS ...`), as ClickHouse formats it."""
    match = re.search(r"\bTTL (.+?)(?: SETTINGS |$)", engine_full)
    return match.group(1).strip() if match else None


def _sync_ttl(client: Client, rule: RetentionRule, engine_full: str) -> str:
    current = _current_ttl(engine_full)
    if rule.days == 0:
        if current is None:
            return "unchanged"
        client.command(f"ALTER TABLE {rule.qualified} REMOVE TTL")
        return "removed"
    if current is not None and _normalise(current) == _normalise(rule.ttl_expression):
        return "unchanged"
    client.command(f"ALTER TABLE {rule.qualified} MODIFY TTL {rule.ttl_expression}", settings=_TTL_ALTER_SETTINGS)
    return "set"


def _normalise(expression: str) -> str:
    return re.sub(r"[\s`]", "", expression)


def enforce_planned(rule: dict[str, Any], now: datetime | None, settings: Settings | None = None) -> dict[str, Any]:
    """One rule as the retention DAG passes it (a dict through XCom), against the configured
    warehouse, counting `days` back from `now` (the run's interval end); returns a JSON-able summary."""
    settings = settings or load_settings()
    now = now or datetime.now(timezone.utc)
    from .warehouse.client import connect

    client = connect(settings.warehouse, database="default")
    try:
        result = enforce(client, RetentionRule(**rule), now)
    finally:
        client.close()
    return {"table": f"{rule['database']}.{rule['table']}", "dropped": result.dropped_partitions,
            "ttl": result.ttl_action}
