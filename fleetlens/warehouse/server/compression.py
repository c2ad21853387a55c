"""HTTP body compression as ClickHouse speaks it: `Content-Encoding` on requests, and on
responses when the client sends `enable_http_compression=1` and an `Accept-Encoding` we support.

Supported: gzip, deflate, zstd, lz4 (LZ4 frame format, as ClickHouse and clickhouse-connect use),
ClickHouse's own block compression (`compress=1` /
`decompress=1` URL parameters) is refused with NOT_IMPLEMENTED: no common client needs it.
Decoders are incremental and bounded, so a compressed bomb is cut off at the body limit
instead of being inflated into memory.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Iterator, Protocol

import lz4.frame
import zstandard
from backports.zstd import ZstdDecompressor

from .errors import ClickHouseError


PIECE = 1 << 20  # decompressed output is produced in pieces of at most this size


class Decoder(Protocol):
    def feed(self, data: bytes) -> Iterator[bytes]: ...


class Encoder(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def flush(self) -> bytes: ...


class _Identity:
    def feed(self, data: bytes) -> Iterator[bytes]:
        if data:
            yield data

    def compress(self, data: bytes) -> bytes:
        return data

    def flush(self) -> bytes:
        return b""


class _ZlibDecoder:
    def __init__(self, wbits: int) -> None:
        self._d = zlib.decompressobj(wbits)

    def feed(self, data: bytes) -> Iterator[bytes]:
        while True:
            out = self._d.decompress(data, PIECE)
            data = self._d.unconsumed_tail
            if out:
                yield out
            if len(out) < PIECE and not data:
                return


class _FrameDecoder:
    """zstd and lz4 frames (possibly several concatenated), decoded piece by piece."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._d = factory()

    def feed(self, data: bytes) -> Iterator[bytes]:
        while True:
            out = self._d.decompress(data, PIECE)
            data = b""
            if out:
                yield out
            if self._d.eof:
                data = self._d.unused_data
                self._d = self._factory()
                if not data:
                    return
            elif self._d.needs_input:
                return


def request_decoder(content_encoding: str | None) -> Decoder:
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity", "none"):
        return _Identity()
    if encoding in ("gzip", "x-gzip"):
        return _ZlibDecoder(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return _ZlibDecoder(zlib.MAX_WBITS)
    if encoding == "zstd":
        return _FrameDecoder(ZstdDecompressor)
    if encoding == "lz4":
        return _FrameDecoder(lz4.frame.LZ4FrameDecompressor)
    raise ClickHouseError.named(
        "UNKNOWN_COMPRESSION_METHOD",
        f"Unsupported Content-Encoding {encoding!r}; supported: {', '.join(supported_encodings())}",
    )


def supported_encodings() -> list[str]:
    return ["gzip", "deflate", "zstd", "lz4"]


class _ZlibEncoder:
    def __init__(self, wbits: int, level: int) -> None:
        self._c = zlib.compressobj(level, zlib.DEFLATED, wbits)

    def compress(self, data: bytes) -> bytes:
        return self._c.compress(data)

    def flush(self) -> bytes:
        return self._c.flush()


class _ZstdEncoder:
    def __init__(self) -> None:
        self._c = zstandard.ZstdCompressor(level=1).compressobj()

    def compress(self, data: bytes) -> bytes:
        return self._c.compress(data)

    def flush(self) -> bytes:
        return self._c.flush()


class _Lz4Encoder:
    def __init__(self) -> None:
        self._c = lz4.frame.LZ4FrameCompressor()
        self._started = False

    def compress(self, data: bytes) -> bytes:
        head = b""
        if not self._started:
            head = self._c.begin()
            self._started = True
        return head + self._c.compress(data)

    def flush(self) -> bytes:
        head = b"" if self._started else self._c.begin()
        self._started = True
        return head + self._c.flush()


def response_encoder(accept_encoding: str | None, level: int = 3) -> tuple[str | None, Encoder]:
    """Pick the first encoding the client accepts that we support (client order wins)."""
    for item in (accept_encoding or "").split(","):
        name = item.split(";")[0].strip().lower()
        if name in ("gzip", "x-gzip"):
            return "gzip", _ZlibEncoder(16 + zlib.MAX_WBITS, level)
        if name == "deflate":
            return "deflate", _ZlibEncoder(zlib.MAX_WBITS, level)
        if name == "zstd":
            return "zstd", _ZstdEncoder()
        if name == "lz4":
            return "lz4", _Lz4Encoder()
    return None, _Identity()
