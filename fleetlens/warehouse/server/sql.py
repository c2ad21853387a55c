"""Just enough SQL scanning to serve the ClickHouse HTTP protocol.

The HTTP interface mixes query text and data in one body: `INSERT INTO t FORMAT Native\\n<binary>`.
The server must find where the query ends and the data begins *without* reading the data
(it may be gigabytes, and binary). ClickHouse's rule, followed here: after `FORMAT <name>`
skip spaces and tabs, then at most one line break; the data starts there. `VALUES` data starts
right after the keyword. Everything else (the engine parses real SQL) is left to chDB.

The scanner works on bytes and skips string literals, quoted identifiers and comments, so a
`'FORMAT JSON'` inside a string is never taken for a clause.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

_WORD_START = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_WORD_CHARS = _WORD_START | frozenset(b"0123456789$")
_SPACE = frozenset(b" \t\r\n\f\v")

# Statements whose result chDB can stream block by block (it refuses EXISTS, SHOW, DESCRIBE, ...).
STREAMABLE_STATEMENTS = frozenset({"SELECT", "WITH"})


class NeedMoreData(Exception):
    """The buffer ends inside the query text: read more of the body and scan again."""


@dataclass(frozen=True)
class Token:
    kind: str  # "word", "quoted", "string", "number", "punct"
    text: bytes
    start: int
    end: int
    depth: int  # parenthesis depth at the token

    @property
    def upper(self) -> str:
        return self.text.decode("latin-1").upper()


def tokens(buf: bytes, *, complete: bool) -> Iterator[Token]:
    """Yield tokens of `buf`. If `complete` is false, a token cut by the end raises NeedMoreData."""
    i, n, depth = 0, len(buf), 0
    while i < n:
        c = buf[i]
        if c in _SPACE:
            i += 1
        elif c == 0x2D and buf[i + 1: i + 2] == b"-" or c == 0x23 and buf[i + 1: i + 2] in (b" ", b"!"):
            end = buf.find(b"\n", i)
            if end < 0:
                if not complete:
                    raise NeedMoreData
                return
            i = end + 1
        elif c == 0x2F and buf[i + 1: i + 2] == b"*":
            end = buf.find(b"*/", i + 2)
            if end < 0:
                if not complete:
                    raise NeedMoreData
                return
            i = end + 2
        elif c in (0x27, 0x22, 0x60):  # ' " `
            j = i + 1
            while True:
                if j >= n:
                    if not complete:
                        raise NeedMoreData
                    j = n
                    break
                if buf[j] == 0x5C:  # backslash escape
                    j += 2
                    continue
                if buf[j] == c:
                    if j + 1 < n and buf[j + 1] == c:  # doubled quote
                        j += 2
                        continue
                    j += 1
                    break
                j += 1
            kind = "string" if c == 0x27 else "quoted"
            yield Token(kind, buf[i:j], i, j, depth)
            i = j
        elif c in _WORD_START:
            j = i + 1
            while j < n and buf[j] in _WORD_CHARS:
                j += 1
            if j == n and not complete:
                raise NeedMoreData
            yield Token("word", buf[i:j], i, j, depth)
            i = j
        elif 0x30 <= c <= 0x39:
            j = i + 1
            while j < n and (buf[j] in _WORD_CHARS or buf[j] == 0x2E):
                j += 1
            yield Token("number", buf[i:j], i, j, depth)
            i = j
        else:
            if c == 0x28:
                yield Token("punct", buf[i: i + 1], i, i + 1, depth)
                depth += 1
            elif c == 0x29:
                depth = max(0, depth - 1)
                yield Token("punct", buf[i: i + 1], i, i + 1, depth)
            else:
                yield Token("punct", buf[i: i + 1], i, i + 1, depth)
            i += 1


def statement_kind(buf: bytes, *, complete: bool = True) -> str:
    """The leading keyword (upper case), looking through parentheses: `(SELECT ...)` is SELECT.

    On an incomplete buffer, NeedMoreData while the keyword may still be coming.
    """
    for token in tokens(buf, complete=complete):
        if token.kind == "word":
            return token.upper
        if token.text != b"(":
            return ""
    if not complete:
        raise NeedMoreData
    return ""


@dataclass(frozen=True)
class InsertSplit:
    """Where an INSERT's query text ends and its data begins."""

    statement: str  # the INSERT without its FORMAT clause / VALUES keyword, for chDB's send_insert
    input_format: str | None  # None: INSERT ... SELECT, run as a whole query
    data_offset: int  # offset of the first data byte in the scanned buffer


def split_insert(buf: bytes, *, complete: bool) -> InsertSplit:
    """Find the data of an INSERT in `buf` (which starts with the query text).

    Raises NeedMoreData when the buffer ends before the query text does and more may come.
    """
    for token in tokens(buf, complete=complete):
        if token.kind != "word" or token.depth != 0:
            continue
        keyword = token.upper
        if keyword == "FORMAT":
            name = _next_word(buf, token.end, complete=complete)
            if name is None:
                raise NeedMoreData if not complete else ValueError("FORMAT clause without a format name")
            name_token = name
            offset = name_token.end
            while offset < len(buf) and buf[offset] in (0x20, 0x09):
                offset += 1
            if offset < len(buf) and buf[offset] == 0x0D and buf[offset + 1: offset + 2] == b"\n":
                offset += 2
            elif offset < len(buf) and buf[offset] == 0x0A:
                offset += 1
            elif offset == len(buf) and not complete:
                raise NeedMoreData  # the line break may still come
            statement = buf[: token.start].decode("utf-8").rstrip()
            return InsertSplit(statement, name_token.text.decode("latin-1"), offset)
        if keyword == "VALUES":
            statement = buf[: token.start].decode("utf-8").rstrip()
            return InsertSplit(statement, "Values", token.end)
        if keyword in ("SELECT", "WITH"):
            return InsertSplit(buf.decode("utf-8") if complete else "", None, len(buf))
    if not complete:
        raise NeedMoreData
    # No FORMAT / VALUES / SELECT: an INSERT with its data elsewhere (e.g. the format named by
    # `default_format`? ClickHouse requires FORMAT) — let the engine report what is wrong.
    return InsertSplit(buf.decode("utf-8", "replace"), None, len(buf))


def _next_word(buf: bytes, offset: int, *, complete: bool) -> Token | None:
    for token in tokens(buf[offset:], complete=complete):
        if token.kind in ("word", "quoted"):
            text = token.text.strip(b'"`') if token.kind == "quoted" else token.text
            return Token("word", text, token.start + offset, token.end + offset, 0)
        return None
    return None


def output_format(query: bytes) -> str | None:
    """The format named by the last top-level `FORMAT x` clause of a (complete) query, if any."""
    found: str | None = None
    expect_name = False
    for token in tokens(query, complete=True):
        if expect_name:
            if token.kind in ("word", "quoted"):
                found = token.text.strip(b'"`').decode("latin-1")
            expect_name = False
        elif token.kind == "word" and token.depth == 0 and token.upper == "FORMAT":
            expect_name = True
    return found


def quote_string(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def quote_identifier(name: str) -> str:
    return "`" + name.replace("\\", "\\\\").replace("`", "\\`") + "`"


def split_top_level(text: str) -> list[str]:
    """Split a comma-separated list at the commas outside parentheses: `Map(String, UInt8),String`."""
    parts: list[str] = []
    depth, start = 0, 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    parts.append(text[start:].strip())
    return [part for part in parts if part]
