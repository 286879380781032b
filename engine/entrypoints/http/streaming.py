"""Server-sent events, and calls that end when their client goes away.

A streamed response is ``data: {json}`` events, then ``data: [DONE]``. Whether streaming or not, a call watches
its connection while it waits for the engine: when the client disconnects, the work is cancelled at once (its
engine requests aborted, their KV blocks freed), not only when the next token would have been written.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from typing import AsyncIterator, Awaitable, Callable, TypeVar

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from glmserve.engine.entrypoints.http.errors import error_body, error_for

DONE = b"data: [DONE]\n\n"
T = TypeVar("T")


class ClientDisconnected(Exception):
    """The client closed the connection before the response was complete."""


def sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def answer_events(chunks: AsyncIterator[bytes], usage: Callable[[], dict] | None) -> AsyncIterator[bytes]:
    """A streamed answer's events: its chunks, then the chunk ``usage()`` builds (``include_usage``), then
    ``[DONE]``. An error once the status line is sent can only go in the stream: as OpenAI's error body, last."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as exc:  # noqa: BLE001 - every failure becomes an error event
        error = error_for(exc)
        yield sse(error_body(error.message, error.type, error.param, error.code))
        return
    if usage is not None:
        yield sse(usage())
    yield DONE


def json_body(payload: dict) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client disconnects (or the response completed). Call it once the body has been read."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(work: Awaitable[T], receive: Receive) -> T:
    """``work``'s result, or ClientDisconnected (with ``work`` cancelled) if the client leaves first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientDisconnected()
    finally:
        await _cancel(task, watch)


class EventStream(Response):
    """An ASGI response streaming ``events`` (already encoded) as text/event-stream; ``on_close`` runs however
    it ends (finished, client gone, server stopping), to release the engine's requests."""

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], Awaitable[None]],
                 headers: dict[str, str] | None = None):
        self.status_code = 200
        self.background = None
        self._events = events
        self._on_close = on_close
        self._headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                         (b"x-accel-buffering", b"no")]   # proxies must not buffer a stream
        self._headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self._headers})
            task = asyncio.ensure_future(self._send_all(send))
            watch = asyncio.ensure_future(wait_for_disconnect(receive))
            try:
                await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
                if task.done():
                    task.result()
            finally:
                await _cancel(task, watch)
        finally:
            await self._on_close()

    async def _send_all(self, send: Send) -> None:
        async with contextlib.aclosing(self._events) as events:
            async for event in events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _cancel(*tasks: asyncio.Future) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
