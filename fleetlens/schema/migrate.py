"""Versioned, idempotent schema migrations for the warehouse.

Each file in `migrations/` is `NNNN_name.sql`: Jinja-templated ClickHouse DDL, statements
separated by `;` at the end of a line. Templates see:

- `db` — the quoted database name from the warehouse URL;
- `on_cluster` — `ON CLUSTER <name>` when `cluster` is configured, else empty;
- `engine(name, *args)` — `MergeTree()`-family engine, `Replicated*` on a cluster;
- `ttl(expression, days)` — a TTL clause, or nothing when days is 0;
- `traces_ttl_days`, `metrics_ttl_days` — from the settings.

Applied migrations are recorded in `fleetlens_migrations` with a checksum; a second run applies
nothing. The same files render for the embedded server and for a real server or cluster.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from typing import Any, Callable

import jinja2

from ..warehouse.server.sql import quote_identifier

log = logging.getLogger("fleetlens.schema")

MIGRATIONS_TABLE = "fleetlens_migrations"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    template: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.template.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RenderOptions:
    database: str
    cluster: str | None = None
    traces_ttl_days: int = 0
    metrics_ttl_days: int = 0


def load_migrations() -> list[Migration]:
    folder = resources.files("fleetlens.schema") / "migrations"
    migrations = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".sql"):
            continue
        number, _, rest = entry.name.partition("_")
        migrations.append(Migration(int(number), rest[:-4], entry.read_text(encoding="utf-8")))
    versions = [m.version for m in migrations]
    if len(versions) != len(set(versions)):
        raise RuntimeError(f"duplicate migration numbers in {folder}: {versions}")
    return migrations


def _engine(cluster: str | None) -> Callable[..., str]:
    def engine(name: str, *args: str) -> str:
        full = f"Replicated{name}" if cluster else name
        return f"{full}({', '.join(args)})"

    return engine


def _ttl(expression: str, days: int) -> str:
    return f"TTL {expression} + toIntervalDay({int(days)})" if days and days > 0 else ""


def render(migration: Migration, options: RenderOptions) -> list[str]:
    """The statements of one migration, rendered for a database (and cluster)."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True)
    text = env.from_string(migration.template).render(
        db=quote_identifier(options.database),
        on_cluster=f"ON CLUSTER {quote_identifier(options.cluster)}" if options.cluster else "",
        engine=_engine(options.cluster),
        ttl=_ttl,
        traces_ttl_days=options.traces_ttl_days,
        metrics_ttl_days=options.metrics_ttl_days,
    )
    return split_statements(text)


def split_statements(text: str) -> list[str]:
    statements, current = [], []
    for line in text.splitlines():
        if line.strip().startswith("--") and not current:
            continue
        current.append(line)
        if line.rstrip().endswith(";"):
            statement = "\n".join(current).strip().rstrip(";").strip()
            if statement:
                statements.append(statement)
            current = []
    tail = "\n".join(current).strip()
    if tail:
        statements.append(tail)
    return statements


def bootstrap_statements(options: RenderOptions) -> list[str]:
    on_cluster = f" ON CLUSTER {quote_identifier(options.cluster)}" if options.cluster else ""
    db = quote_identifier(options.database)
    return [
        f"CREATE DATABASE IF NOT EXISTS {db}{on_cluster}",
        f"CREATE TABLE IF NOT EXISTS {db}.{MIGRATIONS_TABLE}{on_cluster} ("
        "version UInt32, name String, checksum String, applied_at DateTime64(3, 'UTC')"
        f") ENGINE = {_engine(options.cluster)('ReplacingMergeTree', 'applied_at')} ORDER BY version",
    ]


class MigrationError(RuntimeError):
    """A migration statement failed; the message names the migration and the statement."""


@dataclass
class MigrationResult:
    applied: list[Migration]
    already: list[Migration]
    changed: list[Migration]  # applied earlier with a different checksum: reported, not re-run


def migrate(client: Any, options: RenderOptions, *, on_step: Callable[[Migration], None] | None = None
            ) -> MigrationResult:
    """Apply every migration not yet recorded. `client` is a clickhouse-connect client."""
    for statement in bootstrap_statements(options):
        client.command(statement)
    db = quote_identifier(options.database)
    rows = client.query(f"SELECT version, argMax(checksum, applied_at) FROM {db}.{MIGRATIONS_TABLE} "
                        "GROUP BY version").result_rows
    recorded = {int(version): checksum for version, checksum in rows}
    result = MigrationResult([], [], [])
    for migration in load_migrations():
        if migration.version in recorded:
            result.already.append(migration)
            if recorded[migration.version] != migration.checksum:
                log.warning("migration %04d_%s changed since it was applied; not re-run",
                            migration.version, migration.name)
                result.changed.append(migration)
            continue
        for statement in render(migration, options):
            try:
                client.command(statement)
            except Exception as error:
                first_line = statement.splitlines()[0]
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} failed at `{first_line} ...`: {error}"
                ) from error
        client.insert(f"{MIGRATIONS_TABLE}", [[migration.version, migration.name, migration.checksum,
                                               datetime.now(timezone.utc)]],
                      column_names=["version", "name", "checksum", "applied_at"], database=options.database)
        result.applied.append(migration)
        if on_step:
            on_step(migration)
    return result
