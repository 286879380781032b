"""What every protocol frontend of one server reads: the engine once it is loaded, whether the server is serving,
starting, draining or dead, and the generation calls a drain has to wait for.

One ``ServingState`` is shared by the gRPC and the HTTP frontends of a server (``serving.ModelServer`` owns it), so
a drain refuses new work on both protocols at once and waits for the calls of both.
"""
from __future__ import annotations

import asyncio
import enum

from glmserve.engine.entrypoints.chat import ChatTemplate
from glmserve.engine.runtime.async_engine import AsyncEngine


class ServiceUnavailable(RuntimeError):
    """The server cannot take the call right now (loading, warming up, draining): clients should retry later."""


class Status(enum.Enum):
    STARTING = "starting"      # listening; the model is loading and warming up
    SERVING = "serving"
    DRAINING = "draining"      # finishing the calls in flight, taking no new ones
    DEAD = "dead"              # the engine core is gone


class ServingState:
    def __init__(self) -> None:
        self.engine: AsyncEngine | None = None
        self.chat: ChatTemplate | None = None
        self.status = Status.STARTING
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- transitions (made by the server's lifecycle, which tells the listeners) ------------------------------
    def set_engine(self, engine: AsyncEngine) -> None:
        self.chat = ChatTemplate(engine.tokenizer)
        self.engine = engine
        self.status = Status.SERVING

    def start_draining(self) -> int:
        """Refuse new generation calls from now on; returns how many are in flight."""
        if self.status is not Status.DEAD:
            self.status = Status.DRAINING
        return self._in_flight

    def engine_died(self) -> None:
        self.status = Status.DEAD

    # ---- what handlers ask ----------------------------------------------------------------------------------------
    @property
    def serving(self) -> bool:
        return self.status is Status.SERVING and not (self.engine is not None and self.engine.is_dead)

    def ready(self, new_work: bool = False) -> AsyncEngine:
        """The engine, or ServiceUnavailable while it is loading (and, for ``new_work``, while draining)."""
        if self.engine is None:
            raise ServiceUnavailable("the server is starting: the model is not loaded and warmed up yet")
        if new_work and self.status is Status.DRAINING:
            raise ServiceUnavailable("the server is shutting down and takes no new requests")
        return self.engine

    # ---- generation calls in flight (what a drain waits for) ------------------------------------------------------
    def enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def wait_idle(self, timeout: float) -> bool:
        """Whether every generation call in flight finished within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False
