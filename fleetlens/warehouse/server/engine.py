"""The chDB engine behind the HTTP interface.

chDB runs the real ClickHouse engine in-process, and exactly one process may own a data path.
This module is that owner. Each chDB connection is a ClickHouse *session* (its own current
database and settings) and connections run queries in parallel with the GIL released, so:

- a request without `session_id` gets a fresh connection (fresh state, as ClickHouse gives a
  sessionless query), closed afterwards — about 1 ms;
- a request with `session_id` gets that session's connection, kept until `session_timeout`
  seconds of idleness; one request at a time per session (others wait, then SESSION_IS_LOCKED);
- per-request `database` and URL settings are applied before the query and, on a session,
  restored afterwards, because in ClickHouse they are query-level and do not stick to the session.

An "anchor" connection stays open for the life of the engine so that the embedded server is
not torn down and rebuilt between requests.
"""

from __future__ import annotations

import logging
import json
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator

import chdb

from .errors import ClickHouseError, registry
from .sql import quote_identifier, quote_string

log = logging.getLogger("fleetlens.warehouse")


@dataclass
class Session:
    session_id: str
    connection: Any
    timeout_s: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class ExternalTable:
    """External data sent with a query (a multipart/form-data file part): a temporary table for that query."""

    name: str
    columns: str  # the column list of CREATE TABLE, e.g. "a UInt32, b String"
    input_format: str
    data: IO[bytes]


@dataclass
class QueryContext:
    """What a request asks of the engine beyond the SQL text."""

    database: str | None = None
    settings: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    session_id: str | None = None
    session_timeout_s: float | None = None
    session_check: bool = False
    query_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    external_tables: list[ExternalTable] = field(default_factory=list)


class Engine:
    """Owns the chDB data directory for this process and hands out sessions on it."""

    def __init__(self, path: Path, *, session_timeout_s: float = 60.0, session_lock_wait_s: float = 10.0) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.session_timeout_s = session_timeout_s
        self.session_lock_wait_s = session_lock_wait_s
        try:
            self._anchor = chdb.connect(str(self.path))
        except Exception as error:  # e.g. another process holds the path
            raise RuntimeError(f"cannot open the warehouse at {self.path}: {error}") from error
        self._sessions: dict[str, Session] = {}
        self._sessions_lock = threading.Lock()
        self._closed = False
        self.version = self._scalar("SELECT version()")
        self.timezone = self._scalar("SELECT timezone()")
        pairs = self._anchor.query(
            "SELECT DISTINCT name, code FROM system.errors SETTINGS system_events_show_zero_values = 1", "TSV"
        ).bytes().decode()
        registry.load([(n, int(c)) for n, c in (line.split("\t") for line in pairs.splitlines())], self.version)
        names = self._anchor.query("SELECT name FROM system.settings", "TSV").bytes().decode()
        self.known_settings = frozenset(names.split())

    # -- streaming inserts -----------------------------------------------------------------
    # chDB's streaming insert reports errors raised while parsing data, but not those raised when
    # the rows are committed (too many partitions, a CHECK constraint, ...): finish() returns as if
    # all rows were written while none are. The engine still records such an error in
    # system.errors with the query id, so the server tags each streaming INSERT with a marker,
    # learns its query id from system.processes while it runs, and looks it up after finish().

    def streaming_insert_query_id(self, marker: str) -> str | None:
        """The query id of the running INSERT whose text carries `marker`."""
        found = self._lookup(
            "SELECT query_id FROM system.processes WHERE position(query, {m:String}) > 0 "
            "AND position(query, 'system.processes') = 0 LIMIT 1",
            marker,
        )
        return found[0][0] if found else None

    def streaming_insert_error(self, query_id: str) -> ClickHouseError | None:
        """The commit error the engine recorded for `query_id`, if any."""
        found = self._lookup(
            "SELECT code, last_error_message FROM system.errors WHERE query_id = {m:String} LIMIT 1", query_id
        )
        return ClickHouseError(int(found[0][0]), found[0][1]) if found else None

    def _lookup(self, sql: str, value: str) -> list[list[str]]:
        conn = chdb.connect(str(self.path))
        try:
            text = conn.query(sql, "JSONCompact", params={"m": value}).bytes()
        finally:
            conn.close()
        return json.loads(text)["data"] if text else []

    def _scalar(self, sql: str) -> str:
        return self._anchor.query(sql, "TSV").bytes().decode().strip()

    # -- sessions -------------------------------------------------------------------------

    @contextmanager
    def connection(self, ctx: QueryContext) -> Iterator[Any]:
        """A connection prepared for `ctx`; query-level state is undone afterwards."""
        if self._closed:
            raise ClickHouseError.named("ABORTED", "The server is shutting down")
        if ctx.session_id is None:
            conn = chdb.connect(str(self.path))
            try:
                self._apply(conn, ctx)
                yield conn
            finally:
                conn.close()
            return
        session = self._session(ctx)
        if not session.lock.acquire(timeout=self.session_lock_wait_s):
            raise ClickHouseError.named(
                "SESSION_IS_LOCKED", f"Session {ctx.session_id} is locked by a concurrent client."
            )
        broken = False
        try:
            restore: dict[str, Any] = {}
            try:
                self._apply(session.connection, ctx, restore)
            except BaseException:  # a session must not keep half of a failed request's state
                broken = not self._restore(session.connection, restore)
                raise
            try:
                yield session.connection
            finally:
                broken = not self._restore(session.connection, restore)
        finally:
            session.last_used = time.monotonic()
            if broken:  # unknown state: the next request with this session_id starts a fresh one
                with self._sessions_lock:
                    if self._sessions.get(session.session_id) is session:
                        del self._sessions[session.session_id]
                session.connection.close()
            session.lock.release()

    def _session(self, ctx: QueryContext) -> Session:
        assert ctx.session_id is not None
        with self._sessions_lock:
            self._expire_sessions()
            session = self._sessions.get(ctx.session_id)
            if session is None:
                if ctx.session_check:
                    raise ClickHouseError.named(
                        "SESSION_NOT_FOUND", f"Session {ctx.session_id} not found (session_check=1)"
                    )
                session = Session(ctx.session_id, chdb.connect(str(self.path)),
                                  ctx.session_timeout_s or self.session_timeout_s)
                self._sessions[ctx.session_id] = session
            elif ctx.session_timeout_s:
                session.timeout_s = ctx.session_timeout_s
            session.last_used = time.monotonic()
            return session

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for sid, session in list(self._sessions.items()):
            if now - session.last_used > session.timeout_s and session.lock.acquire(blocking=False):
                try:
                    session.connection.close()
                finally:
                    del self._sessions[sid]
                    session.lock.release()

    def close_session(self, session_id: str) -> None:
        with self._sessions_lock:
            session = self._sessions.pop(session_id, None)
        if session:
            with session.lock:
                session.connection.close()

    @property
    def session_count(self) -> int:
        return len(self._sessions)

    # -- query-level state ----------------------------------------------------------------

    def _apply(self, conn: Any, ctx: QueryContext, restore: dict[str, Any] | None = None) -> None:
        """Apply `ctx` to `conn`; on a session, `restore` collects what undoes it (even if this fails)."""
        remember = restore is not None
        restore = {} if restore is None else restore
        unknown = [name for name in ctx.settings if name not in self.known_settings]
        if unknown:
            raise ClickHouseError.named("UNKNOWN_SETTING", f"Unknown setting '{unknown[0]}'")
        if remember and ctx.settings:
            names = ", ".join(quote_string(name) for name in ctx.settings)
            rows = conn.query(f"SELECT name, value, changed FROM system.settings WHERE name IN ({names})",
                              "TSVRaw").bytes().decode()
            restore["settings"] = [line.split("\t") for line in rows.splitlines()]
        if remember and ctx.database:
            restore["database"] = conn.query("SELECT currentDatabase()", "TSVRaw").bytes().decode().strip()
        # `readonly` last: as ClickHouse applies the request's settings at once, readonly=1 must not
        # refuse the other settings, nor the external tables (loaded under the request's settings).
        for name, value in ctx.settings.items():
            if name != "readonly":
                _run(conn, f"SET {quote_identifier(name)} = {quote_string(value)}")
        if ctx.database:
            _run(conn, f"USE {quote_identifier(ctx.database)}")
        for table in ctx.external_tables:
            _run(conn, f"CREATE TEMPORARY TABLE {quote_identifier(table.name)} ({table.columns}) ENGINE = Memory")
            restore.setdefault("tables", []).append(table.name)  # they live for one query, as in ClickHouse
            _load_external_data(conn, table)
        if "readonly" in ctx.settings:
            _run(conn, f"SET readonly = {quote_string(ctx.settings['readonly'])}")

    @staticmethod
    def _restore(conn: Any, restore: dict[str, Any]) -> bool:
        """Undo query-level state on a session; False if that failed (the caller drops the session)."""
        try:
            for name, value, changed in restore.get("settings", []):
                target = quote_string(value) if changed == "1" else "DEFAULT"
                conn.query(f"SET {quote_identifier(name)} = {target}")
            if "database" in restore:
                conn.query(f"USE {quote_identifier(restore['database'])}")
            for name in restore.get("tables", []):
                conn.query(f"DROP TEMPORARY TABLE IF EXISTS {quote_identifier(name)}")
        except Exception:
            log.exception("could not restore session state; dropping the session rather than leak settings")
            return False
        return True

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with self._sessions_lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            with session.lock:
                session.connection.close()
        self._anchor.close()


EXTERNAL_PIECE = 1 << 20


def _load_external_data(conn: Any, table: ExternalTable) -> None:
    try:
        inserter = conn.send_insert(f"INSERT INTO {quote_identifier(table.name)}", table.input_format)
        table.data.seek(0)
        while piece := table.data.read(EXTERNAL_PIECE):
            inserter.append(piece)
        inserter.finish()
    except ClickHouseError:
        raise
    except Exception as error:
        raise ClickHouseError.from_engine(error) from None


def _run(conn: Any, sql: str) -> None:
    try:
        conn.query(sql)
    except Exception as error:
        raise ClickHouseError.from_engine(error) from None
