"""The ASGI response that relays an upstream SSE stream to the client.

Why not Starlette's StreamingResponse: under uvicorn (ASGI spec 2.3) it runs every stream in an
anyio task group with a second task listening for the disconnect, and sends the last (terminating)
chunk only after the body iterator has finished — so whatever the gateway does when a stream ends
(closing spans, settling the rate limiter) was on the client's clock. Here:

- chunks are sent as they come from the upstream, in the request's own task;
- a client that goes away is noticed by a plain asyncio task waiting on `receive()`, which cancels
  the relay: the upstream connection is closed, so the replica stops generating for nobody;
- `finish(outcome)` runs after the client has the whole answer (or is gone): the request's
  accounting is off the latency the client sees, as in Starlette's background tasks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]

SSE_HEADERS = ((b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"))
_END = {"type": "http.response.body", "body": b"", "more_body": False}


class SSERelayResponse:
    """Relay `chunks` with `status`, then `finish(outcome)`: 200 when every chunk reached the
    client, 499 when the client disconnected first, 500 when relaying raised (re-raised after
    `finish`, so the server logs it and drops the connection)."""

    def __init__(self, chunks: AsyncIterator[bytes], finish: Callable[[int], Awaitable[None]],
                 status: int = 200) -> None:
        self.chunks = chunks
        self.finish = finish
        self.status_code = status

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        client_gone = False

        def on_disconnect(watcher: asyncio.Future[None]) -> None:
            nonlocal client_gone
            if not watcher.cancelled() and watcher.exception() is None:
                client_gone = True
                task.cancel()

        watcher = asyncio.ensure_future(_disconnected(receive))
        watcher.add_done_callback(on_disconnect)
        outcome = 500
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": SSE_HEADERS})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            watcher.remove_done_callback(on_disconnect)  # sending the end completes `receive()`
            await send(_END)
            outcome = 200
        except asyncio.CancelledError:
            if not client_gone:
                raise
            task.uncancel()  # our own cancellation, for a client that left: not an error of the server
            outcome = 499
        except OSError:  # ASGI 2.4 servers raise it from send() once the client is gone
            outcome = 499
        finally:
            watcher.remove_done_callback(on_disconnect)
            watcher.cancel()
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                await aclose()
            await self.finish(outcome)


async def _disconnected(receive: Receive) -> None:
    """Return once the client has disconnected (or the response is complete: then the callback
    that would act on it is already removed)."""
    while (await receive())["type"] != "http.disconnect":
        pass
