"""The ClickHouse HTTP interface, served by Starlette over the chDB engine.

One request = one query, as in ClickHouse: the query comes from the `query` URL parameter
and/or the start of the POST body; for `INSERT ... FORMAT X` the data follows the query text
and is streamed into the engine in ~1 MiB pieces (constant memory, any size). Results of
formats that can be concatenated (Native, TSV, CSV, JSONEachRow, RowBinary, ...) are streamed
block by block; other formats (JSON, Arrow, Parquet, Pretty...) are produced whole by the
engine and sent from its buffer without another copy.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import time
import uuid
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

import anyio
from anyio import to_thread
from starlette.applications import Starlette
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ...config import WarehouseServerSettings
from . import sql
from .compression import Decoder, request_decoder, response_encoder
from .engine import Engine, ExternalTable, QueryContext
from .errors import ClickHouseError

log = logging.getLogger("fleetlens.warehouse")

# URL parameters that steer the HTTP exchange rather than the query: accepted and not applied.
TRANSPORT_PARAMS = frozenset(
    {
        "query", "database", "default_format", "user", "password", "quota_key", "stacktrace", "role",
        "query_id", "session_id", "session_timeout", "session_check", "compress", "decompress", "buffer_size",
        "wait_end_of_query", "client_protocol_version", "close_session", "enable_http_compression",
        "http_zlib_compression_level", "send_progress_in_http_headers", "http_headers_progress_interval_ms",
        "http_wait_end_of_query", "http_response_buffer_size", "cancel_http_readonly_queries_on_client_close",
        "add_http_cors_header", "http_native_compression_disable_checksumming_on_decompress",
        "http_write_exception_in_output_format", "http_response_headers", "async_insert_busy_timeout_ms_http",
    }
)

# Output formats whose blocks can be concatenated into one valid document.
STREAMABLE_FORMATS = frozenset(
    f.lower()
    for f in (
        "Native", "TabSeparated", "TSV", "TabSeparatedRaw", "TSVRaw", "CSV", "JSONEachRow", "JSONLines", "NDJSON",
        "JSONCompactEachRow", "JSONStringsEachRow", "JSONCompactStringsEachRow", "RowBinary", "Values",
        "LineAsString", "RawBLOB", "Null",
    )
)

# chDB's Python-object "formats": not formats a ClickHouse server knows.
PYTHON_ONLY_FORMATS = frozenset({"dataframe", "datastore", "arrowtable"})

CONTENT_TYPES = {
    "tabseparated": "text/tab-separated-values; charset=UTF-8",
    "tsv": "text/tab-separated-values; charset=UTF-8",
    "csv": "text/csv; charset=UTF-8; header=absent",
    "json": "application/json; charset=UTF-8",
    "jsoneachrow": "application/x-ndjson; charset=UTF-8",
}

RESPONSE_PIECE = 1 << 20
INSERT_BATCH = 1 << 20

# With multipart/form-data, these URL parameter suffixes describe external tables, not settings.
EXTERNAL_TABLE_SUFFIXES = ("_format", "_types", "_structure")
MAX_FORM_FIELDS = 1_000_000  # ClickHouse's http_max_fields
MAX_FORM_FILES = 1_000
_FORMAT_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass
class BodyReader:
    """Reads the request body: raw pieces off the wire, decoded with the body limit enforced."""

    stream: AsyncIterator[bytes]
    decoder: Decoder
    limit: int
    raw_bytes: int = 0
    decoded_bytes: int = 0
    eof: bool = False

    async def read_raw(self, at_least: int = 1) -> bytes:
        parts: list[bytes] = []
        size = 0
        while size < at_least and not self.eof:
            try:
                chunk = await self.stream.__anext__()
            except StopAsyncIteration:
                self.eof = True
                break
            if not chunk:
                continue
            self.raw_bytes += len(chunk)
            if self.raw_bytes > self.limit:
                raise _too_large(self.limit)
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts)

    def decode(self, raw: bytes) -> Iterator[bytes]:
        try:
            for piece in self.decoder.feed(raw):
                self.decoded_bytes += len(piece)
                if self.decoded_bytes > self.limit:
                    raise _too_large(self.limit)
                yield piece
        except ClickHouseError:
            raise
        except Exception as error:
            raise ClickHouseError.named("CANNOT_DECOMPRESS", f"Cannot decompress the request body: {error}") from None


def _too_large(limit: int) -> ClickHouseError:
    return ClickHouseError.named(
        "QUERY_IS_TOO_LARGE", f"Request body is larger than the configured limit of {limit} bytes (max_body_bytes)"
    )


class WarehouseApp:
    """Builds the Starlette application for one engine and one server configuration."""

    def __init__(self, engine: Engine, config: WarehouseServerSettings) -> None:
        self.engine = engine
        self.config = config
        self.limiter = anyio.CapacityLimiter(config.max_concurrent_queries)
        self.app = Starlette(
            routes=[
                Route("/", self.handle, methods=["GET", "POST"]),
                Route("/ping", self.ping, methods=["GET", "HEAD"]),
                Route("/replicas_status", self.ping, methods=["GET"]),
            ],
        )

    async def ping(self, request: Request) -> Response:
        return PlainTextResponse("Ok.\n")

    # -- request handling -----------------------------------------------------------------

    async def handle(self, request: Request) -> Response:
        started = time.perf_counter()
        params = request.query_params
        if request.method == "GET" and "query" not in params:
            return PlainTextResponse("Ok.\n")
        ctx = QueryContext(query_id=params.get("query_id") or QueryContext().query_id)
        headers = {"X-ClickHouse-Query-Id": ctx.query_id, "X-ClickHouse-Timezone": self.engine.timezone,
                   "X-ClickHouse-Server-Display-Name": "fleetlens"}
        try:
            self._authenticate(request)
            self._fill_context(request, ctx)
            response = await self._execute(request, ctx, headers)
        except ClickHouseError as error:
            response = self._error_response(error, headers)
        except Exception as error:  # never let one request take the server down
            log.exception("unexpected error serving query %s", ctx.query_id)
            response = self._error_response(ClickHouseError.from_engine(error), headers)
        log.debug("query %s -> %s in %.1f ms", ctx.query_id, response.status_code,
                  (time.perf_counter() - started) * 1000)
        return response

    def _error_response(self, error: ClickHouseError, headers: dict[str, str]) -> Response:
        headers = dict(headers, **{"X-ClickHouse-Exception-Code": str(error.code)})
        if error.http_status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="FleetLens warehouse"'
        return Response(error.body(), status_code=error.http_status, headers=headers,
                        media_type="text/plain; charset=UTF-8")

    def _authenticate(self, request: Request) -> None:
        expected = self.config.password.get_secret_value() if self.config.password else None
        if expected is None:
            return
        user, password = None, None
        authorization = request.headers.get("authorization", "")
        if authorization.lower().startswith("basic "):
            try:
                decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise ClickHouseError.named("AUTHENTICATION_FAILED", "Malformed Basic authorization header") from None
            user, _, password = decoded.partition(":")
        elif "x-clickhouse-user" in request.headers or "x-clickhouse-key" in request.headers:
            user = request.headers.get("x-clickhouse-user", "default")
            password = request.headers.get("x-clickhouse-key", "")
        elif "user" in request.query_params or "password" in request.query_params:
            user = request.query_params.get("user", "default")
            password = request.query_params.get("password", "")
        if user is None:
            raise ClickHouseError.named("REQUIRED_PASSWORD", f"{self.config.user}: password is required")
        user_ok = hmac.compare_digest(user.encode(), self.config.user.encode())
        password_ok = hmac.compare_digest((password or "").encode(), expected.encode())
        if not (user_ok and password_ok):
            raise ClickHouseError.named(
                "AUTHENTICATION_FAILED",
                f"{user}: Authentication failed: password is incorrect, or there is no user with such name",
            )

    def _fill_context(self, request: Request, ctx: QueryContext) -> None:
        params = request.query_params
        if params.get("compress") in ("1", "true") or params.get("decompress") in ("1", "true"):
            raise ClickHouseError.named(
                "NOT_IMPLEMENTED",
                "ClickHouse block compression (compress=1 / decompress=1) is not supported by the FleetLens "
                "embedded server; use HTTP compression (Content-Encoding / Accept-Encoding) instead",
            )
        ctx.database = params.get("database") or request.headers.get("x-clickhouse-database") or None
        ctx.session_id = params.get("session_id") or None
        if "session_timeout" in params:
            try:
                ctx.session_timeout_s = float(params["session_timeout"])
            except ValueError:
                raise ClickHouseError.named("BAD_ARGUMENTS", "session_timeout must be a number") from None
        ctx.session_check = params.get("session_check") in ("1", "true")
        form = _is_form(request)
        for key, value in params.multi_items():
            if key.startswith("param_"):
                ctx.params[key[6:]] = value
            elif form and key.endswith(EXTERNAL_TABLE_SUFFIXES):
                continue
            elif key not in TRANSPORT_PARAMS:
                ctx.settings[key] = value
        if request.method == "GET" and "readonly" not in ctx.settings:
            ctx.settings["readonly"] = "2"  # as ClickHouse: GET requests cannot write

    async def _execute(self, request: Request, ctx: QueryContext, headers: dict[str, str]) -> Response:
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > self.config.max_body_bytes:
            raise _too_large(self.config.max_body_bytes)
        if _is_form(request):
            form = await self._read_form(request, ctx)
            try:
                return await self._execute_text(request, ctx, headers, form.query, _no_body(self.config.max_body_bytes))
            finally:
                await form.data.close()
        body = BodyReader(request.stream(), request_decoder(request.headers.get("content-encoding")),
                          self.config.max_body_bytes)
        query_param = request.query_params.get("query", "")
        buf = (query_param.encode("utf-8") + b"\n") if query_param else b""
        return await self._execute_text(request, ctx, headers, buf, body)

    async def _execute_text(self, request: Request, ctx: QueryContext, headers: dict[str, str], buf: bytes,
                            body: BodyReader) -> Response:
        """Run the query that starts with `buf` and goes on in `body` (INSERT data included)."""

        # Read until the leading keyword is known.
        while True:
            try:
                first = sql.statement_kind(buf, complete=body.eof)
                break
            except sql.NeedMoreData:
                if len(buf) > self.config.max_query_bytes:
                    raise _query_too_large(self.config.max_query_bytes) from None
                buf += b"".join(body.decode(await body.read_raw()))
        if first == "INSERT":
            while True:
                try:
                    split = sql.split_insert(buf, complete=body.eof)
                    break
                except sql.NeedMoreData:
                    if len(buf) > self.config.max_query_bytes:
                        raise _query_too_large(self.config.max_query_bytes) from None
                    buf += b"".join(body.decode(await body.read_raw()))
            if split.input_format is not None:
                return await self._insert(ctx, split, buf[split.data_offset:], body, headers)
        # Any other statement: the whole body is query text.
        while not body.eof:
            buf += b"".join(body.decode(await body.read_raw(64 * 1024)))
            if len(buf) > self.config.max_query_bytes:
                raise _query_too_large(self.config.max_query_bytes)
        text = buf.decode("utf-8", "replace").strip()
        if not text:
            raise ClickHouseError.named("SYNTAX_ERROR", "Empty query")
        return await self._query(request, ctx, text, headers)

    # -- multipart/form-data --------------------------------------------------------------

    async def _read_form(self, request: Request, ctx: QueryContext) -> ParsedForm:
        """A multipart/form-data body, read as ClickHouse reads it.

        clickhouse-connect sends one when bind parameters would make the URL too long, or with
        external data. The query is the `query` URL parameter followed directly by every `query`
        field; `param_*` fields bind parameters the URL does not; a part with a filename is an
        external table (`<name>_format`, `<name>_structure` or `<name>_types` in the URL or a field);
        other fields are ignored (settings come from the URL only). The body is not query text.
        """
        body = BodyReader(request.stream(), request_decoder(None), self.config.max_body_bytes)

        async def raw() -> AsyncIterator[bytes]:
            while not body.eof:
                chunk = await body.read_raw()
                if chunk:
                    yield chunk

        parser = MultiPartParser(request.headers, raw(), max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS,
                                 max_part_size=self.config.max_query_bytes)
        try:
            data = await parser.parse()
        except MultiPartException as error:
            raise ClickHouseError.named("BAD_ARGUMENTS", f"Cannot parse the multipart/form-data body: {error.message}") from None
        try:
            text = request.query_params.get("query", "")
            fields = dict(request.query_params)
            for key, value in data.multi_items():
                if isinstance(value, UploadFile):
                    continue
                if key == "query":
                    text += value
                elif key.startswith("param_"):
                    ctx.params.setdefault(key[6:], value)
                fields.setdefault(key, value)
            query = text.encode("utf-8")
            if len(query) > self.config.max_query_bytes:
                raise _query_too_large(self.config.max_query_bytes)
            for key, value in data.multi_items():
                if isinstance(value, UploadFile):
                    ctx.external_tables.append(_external_table(key, value, fields))
        except BaseException:
            await data.close()
            raise
        return ParsedForm(query, data)

    # -- INSERT with data -----------------------------------------------------------------

    async def _insert(self, ctx: QueryContext, split: sql.InsertSplit, head: bytes, body: BodyReader,
                      headers: dict[str, str]) -> Response:
        started = time.perf_counter()
        async with self.limiter:
            lease = self.engine.connection(ctx)
            conn = await to_thread.run_sync(lease.__enter__)
            try:
                marker = f"fleetlens-insert:{uuid.uuid4().hex}"
                inserter = await to_thread.run_sync(_start_insert, conn, split, marker)
                query_id = await to_thread.run_sync(self.engine.streaming_insert_query_id, marker)
                try:
                    pending = head
                    while True:
                        raw = await body.read_raw(INSERT_BATCH)
                        await to_thread.run_sync(_append, inserter, body, pending, raw)
                        pending = b""
                        if body.eof:
                            break
                    result = await to_thread.run_sync(_finish, inserter)
                    failure = query_id and await to_thread.run_sync(self.engine.streaming_insert_error, query_id)
                    if failure:
                        raise failure
                except BaseException:
                    await to_thread.run_sync(_cancel, inserter)
                    raise
            finally:
                await _release(lease)
        summary = {
            "read_rows": "0", "read_bytes": "0", "written_rows": str(result.rows_written),
            "written_bytes": str(result.bytes_written), "total_rows_to_read": "0", "result_rows": "0",
            "result_bytes": "0", "elapsed_ns": str(int((time.perf_counter() - started) * 1e9)),
        }
        headers["X-ClickHouse-Summary"] = json.dumps(summary, separators=(",", ":"))
        return Response(b"", headers=headers, media_type="text/plain; charset=UTF-8")

    # -- everything else ------------------------------------------------------------------

    async def _query(self, request: Request, ctx: QueryContext, text: str, headers: dict[str, str]) -> Response:
        params = request.query_params
        default_format = params.get("default_format") or request.headers.get("x-clickhouse-format") or "TabSeparated"
        encoded = text.encode("utf-8")
        fmt = sql.output_format(encoded) or default_format
        headers["X-ClickHouse-Format"] = fmt
        kind = sql.statement_kind(encoded)
        wait_end = params.get("wait_end_of_query") in ("1", "true")
        encoding, encoder = (None, None)
        if params.get("enable_http_compression") in ("1", "true"):
            encoding, encoder = response_encoder(request.headers.get("accept-encoding"),
                                                 int(params.get("http_zlib_compression_level", "3")))
        media_type = CONTENT_TYPES.get(fmt.lower(), "application/octet-stream")
        if encoding:
            headers["Content-Encoding"] = encoding

        if fmt.lower() in PYTHON_ONLY_FORMATS or default_format.lower() in PYTHON_ONLY_FORMATS:
            raise ClickHouseError.named("UNKNOWN_FORMAT", f"Unknown output format {fmt}")
        stream_it = kind in sql.STREAMABLE_STATEMENTS and fmt.lower() in STREAMABLE_FORMATS and not wait_end
        # The slot is held until the body is sent, which Starlette does in another task.
        slot = object()
        await self.limiter.acquire_on_behalf_of(slot)
        lease: AbstractContextManager[Any] | None = self.engine.connection(ctx)
        try:
            conn = await to_thread.run_sync(lease.__enter__)
            if stream_it:
                stream = await to_thread.run_sync(_send_query, conn, text, default_format, ctx.params)
                first = await to_thread.run_sync(_fetch, stream)
                chunks = self._stream_chunks(stream, first, lease, slot, encoder)
                lease = None  # the response body owns it now
                headers["X-ClickHouse-Summary"] = _summary(None, 0)
                return StreamingResponse(chunks, headers=headers, media_type=media_type)
            started = time.perf_counter()
            result = await to_thread.run_sync(_run_query, conn, text, default_format, ctx.params)
            headers["X-ClickHouse-Summary"] = _summary(result, time.perf_counter() - started)
            if result is None or result.size() == 0:
                payload = encoder.flush() if encoder else b""
                return Response(payload, headers=headers, media_type=media_type)
            chunks = self._buffer_chunks(result, lease, slot, encoder)
            lease = None
            return StreamingResponse(chunks, headers=headers, media_type=media_type)
        finally:
            if lease is not None:
                await _release(lease)
                self.limiter.release_on_behalf_of(slot)

    async def _stream_chunks(self, stream: Any, first: bytes | None, lease: AbstractContextManager[Any],
                             slot: object, encoder: Any) -> AsyncIterator[bytes]:
        try:
            chunk = first
            while chunk is not None:
                yield encoder.compress(chunk) if encoder else chunk
                chunk = await to_thread.run_sync(_fetch, stream)
            if encoder:
                yield encoder.flush()
        except ClickHouseError as error:  # after the headers: as ClickHouse, the error ends the body
            log.warning("query failed mid-stream: %s", error.text)
            tail = b"\n" + error.body()
            yield (encoder.compress(tail) + encoder.flush()) if encoder else tail
        finally:
            with anyio.CancelScope(shield=True):
                await to_thread.run_sync(_close_stream, stream)
            await _release(lease)
            self.limiter.release_on_behalf_of(slot)

    async def _buffer_chunks(self, result: Any, lease: AbstractContextManager[Any], slot: object,
                             encoder: Any) -> AsyncIterator[bytes]:
        try:
            view = result.get_memview().view()
            for offset in range(0, len(view), RESPONSE_PIECE):
                piece = bytes(view[offset: offset + RESPONSE_PIECE])
                yield encoder.compress(piece) if encoder else piece
            if encoder:
                yield encoder.flush()
        finally:
            del result
            await _release(lease)
            self.limiter.release_on_behalf_of(slot)


@dataclass
class ParsedForm:
    query: bytes
    data: FormData


def _is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


def _no_body(limit: int) -> BodyReader:
    async def empty() -> AsyncIterator[bytes]:
        return
        yield b""

    return BodyReader(empty(), request_decoder(None), limit, eof=True)


def _external_table(name: str, part: UploadFile, fields: dict[str, str]) -> ExternalTable:
    if not name:
        raise ClickHouseError.named("BAD_ARGUMENTS", "External table name is empty")
    input_format = fields.get(f"{name}_format") or "TabSeparated"
    if not _FORMAT_NAME.fullmatch(input_format):
        raise ClickHouseError.named("UNKNOWN_FORMAT", f"Unknown input format {input_format}")
    if fields.get(f"{name}_structure"):
        columns = fields[f"{name}_structure"]
    elif fields.get(f"{name}_types"):
        types = sql.split_top_level(fields[f"{name}_types"])
        columns = ", ".join(f"_{i} {type_name}" for i, type_name in enumerate(types, 1))
    else:
        raise ClickHouseError.named(
            "BAD_ARGUMENTS",
            f"Neither structure nor types have not been provided for external table {name}. "
            f"Use fields {name}_structure or {name}_types to do so.",
        )
    return ExternalTable(name, columns, input_format, part.file)


def _query_too_large(limit: int) -> ClickHouseError:
    return ClickHouseError.named("QUERY_IS_TOO_LARGE", f"Query is too large (max_query_bytes = {limit})")


def _summary(result: Any, elapsed: float) -> str:
    def num(name: str) -> str:
        return str(getattr(result, name)()) if result is not None else "0"

    return json.dumps(
        {
            "read_rows": num("rows_read"), "read_bytes": num("bytes_read"), "written_rows": num("rows_written"),
            "written_bytes": num("bytes_written"), "total_rows_to_read": "0", "result_rows": "0",
            "result_bytes": str(result.size()) if result is not None else "0",
            "elapsed_ns": str(int(elapsed * 1e9)),
        },
        separators=(",", ":"),
    )


async def _release(lease: AbstractContextManager[Any]) -> None:
    with anyio.CancelScope(shield=True):
        await to_thread.run_sync(lease.__exit__, None, None, None)


def _engine_call(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except ClickHouseError:
        raise
    except Exception as error:
        raise ClickHouseError.from_engine(error) from None


def _start_insert(conn: Any, split: sql.InsertSplit, marker: str) -> Any:
    return _engine_call(conn.send_insert, f"{split.statement} /* {marker} */", split.input_format)


def _append(inserter: Any, body: BodyReader, head: bytes, raw: bytes) -> None:
    if head:
        _engine_call(inserter.append, head)
    for piece in body.decode(raw):
        _engine_call(inserter.append, piece)


def _finish(inserter: Any) -> Any:
    return _engine_call(inserter.finish)


def _cancel(inserter: Any) -> None:
    try:
        inserter.cancel()
    except Exception:  # already failed inside the engine: nothing was committed by this call
        pass


def _send_query(conn: Any, text: str, fmt: str, params: dict[str, str]) -> Any:
    return _engine_call(conn.send_query, text, fmt, params or None)


def _fetch(stream: Any) -> bytes | None:
    chunk = _engine_call(stream.fetch)
    return None if chunk is None else chunk.bytes()


def _close_stream(stream: Any) -> None:
    try:
        stream.close()
    except Exception:
        pass


def _run_query(conn: Any, text: str, fmt: str, params: dict[str, str]) -> Any:
    return _engine_call(conn.query, text, fmt, params or None)
