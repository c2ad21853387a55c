"""One place that turns failures into ClickHouse-style HTTP errors.

Clients (clickhouse-connect, dbt-clickhouse, Grafana) recognise a ClickHouse error by the
`X-ClickHouse-Exception-Code` header and a body that starts with `Code: N. DB::Exception:`.
The HTTP status follows ClickHouse's own `exceptionCodeToHTTPStatus` (src/Server/HTTP), keyed
by error *name*; the numbers come from the engine's `system.errors`, so they cannot drift.
"""

from __future__ import annotations

import re

# Error names whose HTTP status differs from 500, as ClickHouse's HTTP handler maps them.
_STATUS_BY_NAME: dict[str, int] = {
    "REQUIRED_PASSWORD": 401,
    **dict.fromkeys(
        ["UNKNOWN_USER", "WRONG_PASSWORD", "AUTHENTICATION_FAILED", "SET_NON_GRANTED_ROLE", "ACCESS_DENIED"], 403
    ),
    **dict.fromkeys(
        [
            "BAD_ARGUMENTS", "CANNOT_COMPILE_REGEXP", "CANNOT_PARSE_TEXT", "CANNOT_PARSE_ESCAPE_SEQUENCE",
            "CANNOT_PARSE_QUOTED_STRING", "CANNOT_PARSE_DATE", "CANNOT_PARSE_DATETIME", "CANNOT_PARSE_NUMBER",
            "CANNOT_PARSE_DOMAIN_VALUE_FROM_STRING", "CANNOT_PARSE_IPV4", "CANNOT_PARSE_IPV6",
            "CANNOT_PARSE_INPUT_ASSERTION_FAILED", "CANNOT_PARSE_UUID", "DUPLICATE_COLUMN", "ILLEGAL_COLUMN",
            "UNKNOWN_ELEMENT_IN_AST", "UNKNOWN_TYPE_OF_AST_NODE", "THERE_IS_NO_COLUMN", "TOO_DEEP_AST",
            "TOO_BIG_AST", "UNEXPECTED_AST_STRUCTURE", "SYNTAX_ERROR", "INCORRECT_DATA", "TYPE_MISMATCH",
            "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
        ],
        400,
    ),
    **dict.fromkeys(
        [
            "UNKNOWN_TABLE", "UNKNOWN_FUNCTION", "UNKNOWN_IDENTIFIER", "UNKNOWN_TYPE", "UNKNOWN_STORAGE",
            "UNKNOWN_DATABASE", "UNKNOWN_SETTING", "UNKNOWN_DIRECTION_OF_SORTING", "UNKNOWN_AGGREGATE_FUNCTION",
            "UNKNOWN_FORMAT", "UNKNOWN_DATABASE_ENGINE", "UNKNOWN_TYPE_OF_QUERY", "UNKNOWN_ROLE",
        ],
        404,
    ),
    "QUERY_IS_TOO_LARGE": 413,
    "NOT_IMPLEMENTED": 501,
    "SOCKET_TIMEOUT": 503,
    "CANNOT_OPEN_FILE": 503,
    "HTTP_LENGTH_REQUIRED": 411,
    "TIMEOUT_EXCEEDED": 408,
    "CANNOT_SCHEDULE_TASK": 503,
    "UNSUPPORTED_MEDIA_TYPE": 415,
}

# Codes used before the engine is asked (stable across ClickHouse versions); the registry
# below overrides them with the engine's own numbers when it starts.
_FALLBACK_CODES: dict[str, int] = {
    "UNKNOWN_EXCEPTION": 1002,
    "SYNTAX_ERROR": 62,
    "BAD_ARGUMENTS": 36,
    "NOT_IMPLEMENTED": 48,
    "UNKNOWN_DATABASE": 81,
    "UNKNOWN_SETTING": 115,
    "QUERY_IS_TOO_LARGE": 229,
    "CANNOT_DECOMPRESS": 271,
    "UNKNOWN_COMPRESSION_METHOD": 89,
    "SESSION_NOT_FOUND": 372,
    "SESSION_IS_LOCKED": 373,
    "REQUIRED_PASSWORD": 194,
    "AUTHENTICATION_FAILED": 516,
    "UNSUPPORTED_MEDIA_TYPE": 779,
    "TOO_MANY_SIMULTANEOUS_QUERIES": 202,
    "ABORTED": 236,
    "CANNOT_READ_ALL_DATA": 33,
    "READONLY": 164,
}

_CODE_RE = re.compile(r"Code: (\d+)\. ")
_NAME_RE = re.compile(r"\(([A-Z][A-Z0-9_]+)\)(?: \(version [^)]*\))?\s*$")
_WRAPPER_PREFIXES = ("Streaming query failed: ", "Streaming insert finish failed: ", "Streaming insert append failed: ")


class ErrorRegistry:
    """Error names ↔ numeric codes, filled from the engine at start-up."""

    def __init__(self) -> None:
        self.code_by_name: dict[str, int] = dict(_FALLBACK_CODES)
        self.name_by_code: dict[int, str] = {code: name for name, code in self.code_by_name.items()}
        self.version = ""

    def load(self, pairs: list[tuple[str, int]], version: str) -> None:
        for name, code in pairs:
            self.code_by_name[name] = code
            self.name_by_code[code] = name
        self.version = version

    def code(self, name: str) -> int:
        return self.code_by_name.get(name, self.code_by_name["UNKNOWN_EXCEPTION"])


registry = ErrorRegistry()


class ClickHouseError(Exception):
    """An error with a ClickHouse code, rendered the way a ClickHouse server renders it."""

    def __init__(self, code: int, message: str, name: str | None = None) -> None:
        self.code = code
        self.name = name or registry.name_by_code.get(code, "UNKNOWN_EXCEPTION")
        self.text = message
        super().__init__(message)

    @classmethod
    def named(cls, name: str, message: str) -> ClickHouseError:
        return cls(registry.code(name), message, name)

    @classmethod
    def from_engine(cls, error: BaseException) -> ClickHouseError:
        """Wrap an exception raised by chDB, keeping its code and `DB::Exception` text."""
        if isinstance(error, ClickHouseError):
            return error
        text = str(error).strip()
        for prefix in _WRAPPER_PREFIXES:
            if text.startswith(prefix):
                text = text[len(prefix):]
        match = _CODE_RE.search(text)
        if not match:
            return cls.named("UNKNOWN_EXCEPTION", text or type(error).__name__)
        code = int(match.group(1))
        # chDB sometimes nests the prefix ("Code: 115. DB::Exception: Code: 115. DB::Exception: ...").
        body = text[match.start():]
        inner = _CODE_RE.search(body, 1)
        if inner and body[: inner.start()].rstrip().endswith("DB::Exception:"):
            body = body[inner.start():]
        name_match = _NAME_RE.search(body)
        name = name_match.group(1) if name_match else registry.name_by_code.get(code)
        return cls(code, body, name)

    @property
    def http_status(self) -> int:
        return _STATUS_BY_NAME.get(self.name, 500)

    def body(self) -> bytes:
        """`Code: N. DB::Exception: message. (NAME) (version X)` with a trailing newline."""
        text = self.text
        if not text.startswith("Code: "):
            text = f"Code: {self.code}. DB::Exception: {text}. ({self.name})"
        if "(version " not in text and registry.version:
            text += f" (version {registry.version} (FleetLens embedded chDB))"
        return text.encode("utf-8", "replace") + b"\n"
