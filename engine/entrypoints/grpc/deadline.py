"""Enforce a call's deadline on the server side, so the request is aborted and its blocks freed when it passes.

gRPC cancels a handler whose deadline passed, but only once its own timer fires, and a client that sends no
deadline can still be given one by a proxy. A timer of our own raises ``TimeoutError`` in the handler, which then
closes its engine stream (aborting the request) and answers DEADLINE_EXCEEDED. Works on Python 3.10, where
``asyncio.timeout`` does not exist yet.
"""
from __future__ import annotations

import asyncio


class Deadline:
    """``async with Deadline(seconds):`` cancels the body when ``seconds`` pass (None: never) and raises
    ``TimeoutError`` instead of the ``CancelledError``. Any other cancellation (the client went away) passes
    through unchanged."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.expired = False
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> "Deadline":
        if self.seconds is not None:
            if self.seconds <= 0:
                self.expired = True
                raise TimeoutError
            self._task = asyncio.current_task()
            self._handle = asyncio.get_running_loop().call_later(self.seconds, self._expire)
        return self

    def _expire(self) -> None:
        self.expired = True
        self._task.cancel()

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if self._handle is not None:
            self._handle.cancel()
        if exc_type is asyncio.CancelledError and self.expired:
            # Our own cancel: consume it so the task is not left marked as cancelling (3.11+).
            uncancel = getattr(self._task, "uncancel", None)
            if uncancel is not None:
                uncancel()
            raise TimeoutError from None
        return False
