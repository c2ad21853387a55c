"""The gateway's upstream HTTP: httpx's API over aiohttp's connection pool.

Why not httpx's own transport: httpcore 1.0's pool walks every pooled connection on each request
and each response close, with a socket-readability syscall per idle connection (encode/httpcore#924,
#1035). With a few hundred keep-alive connections to vLLM replicas that walk was the largest single
cost in the gateway's profile (15-48 % of its CPU at 50 concurrent streams, bench/gateway_overhead.py).
aiohttp's connector hands out a pooled connection in constant time.

Keep-alive races: vLLM's server (uvicorn) closes a connection idle for 5 s
(VLLM_HTTP_TIMEOUT_KEEP_ALIVE). A request written on a pooled connection just as the replica closes
it fails with no answer — a replica marked failed, a fallback or a 502, for nothing. So pooled
connections are dropped after `keepalive_s` (4 s) idle, before the replica drops them, and a request
whose connection is closed or reset before any answer arrives is sent once more (aiohttp itself
retries only idempotent methods; a completion has no side effect but its compute).

Why keep httpx's API: the gateway's code and its in-process tests (httpx.ASGITransport to stub apps,
no sockets) stay as they are; only the production transport changes. Errors are mapped to httpx's
exception classes, so the gateway's fallback rules (timeout vs transport error) read the same.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator

import aiohttp
import httpx

# Headers aiohttp computes itself; accept-encoding is dropped so replicas answer uncompressed SSE
# (the gateway parses usage out of the stream as it relays it).
_SKIP = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"accept-encoding"})


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, response: aiohttp.ClientResponse, request: httpx.Request) -> None:
        self._response = response
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            raise _mapped(error, self._request) from error

    async def aclose(self) -> None:
        self._response.release()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """An httpx transport backed by one aiohttp session, created on first use on the running loop."""

    def __init__(self, *, max_connections: int = 1024, max_per_host: int = 0, keepalive_s: float = 4.0) -> None:
        self._limits = (max_connections, max_per_host, keepalive_s)
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            limit, per_host, keepalive = self._limits
            connector = aiohttp.TCPConnector(limit=limit, limit_per_host=per_host, keepalive_timeout=keepalive,
                                             enable_cleanup_closed=True)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  skip_auto_headers=("User-Agent", "Accept-Encoding"))
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeouts.get("connect"),
                                        sock_read=timeouts.get("read"))
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw
                   if k.lower() not in _SKIP]
        body = await request.aread()
        for last_try in (False, True):
            try:
                response = await self._get_session().request(
                    request.method, str(request.url), headers=headers, data=body or None, timeout=timeout,
                    allow_redirects=False)
                break
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                if last_try or not _closed_unanswered(error):
                    raise _mapped(error, request) from error
        return httpx.Response(status_code=response.status, headers=list(response.raw_headers),
                              stream=_ResponseStream(response, request), request=request,
                              extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _closed_unanswered(error: BaseException) -> bool:
    """The connection was closed or reset before any answer: a keep-alive race, or a replica gone
    (then the second try is refused at connect, a clean ConnectError)."""
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return True
    return (isinstance(error, aiohttp.ClientOSError) and not isinstance(error, aiohttp.ClientConnectorError)
            and error.errno in (errno.ECONNRESET, errno.EPIPE))


def _mapped(error: BaseException, request: httpx.Request) -> httpx.TransportError:
    """The httpx exception the gateway's fallback rules expect for an aiohttp error."""
    message = str(error) or type(error).__name__
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message, request=request)
    if isinstance(error, (aiohttp.ServerTimeoutError, asyncio.TimeoutError)):
        return httpx.ReadTimeout(message, request=request)
    if isinstance(error, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message, request=request)
    if isinstance(error, (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError)):
        return httpx.RemoteProtocolError(message, request=request)
    return httpx.ReadError(message, request=request)
