"""One server's lifecycle, above its protocols: listen, start the engine core, serve, drain, stop.

A ``ModelServer`` owns the engine core (behind one ``AsyncEngine``), the Prometheus metrics and the serving state
(starting, serving, draining, dead; the generation calls in flight). The protocols are listeners of it, all on
the server's one event loop: gRPC (``glmserve.v1.Generation``, health, reflection) always, and the
OpenAI-compatible HTTP API when ``http_port`` is set. Every listener binds before the model loads and answers
"not ready" (gRPC NOT_SERVING and UNAVAILABLE, HTTP 503) until the engine is loaded and warmed up. A drain stops
new generation calls on every protocol at once, waits for the ones in flight on all of them, then stops.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable

from glmserve.engine.entrypoints.grpc.server import GrpcListener
from glmserve.engine.entrypoints.metrics import ServerMetrics
from glmserve.engine.entrypoints.server_options import ServerOptions
from glmserve.engine.entrypoints.serving_state import ServingState, Status
from glmserve.engine.runtime.async_engine import AsyncEngine
from glmserve.engine.runtime.core_client import EngineCoreClient

log = logging.getLogger(__name__)

# Calls still running when a stop is requested get this long to send their final status.
STOP_GRACE_SECONDS = 1.0


class ModelServer:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.metrics = ServerMetrics()
        self.state = ServingState()
        self.grpc = GrpcListener(options, self.state, self.metrics)
        self.http = None
        if options.http_port is not None:
            from glmserve.engine.entrypoints.http.server import HttpListener   # FastAPI only where HTTP is on
            self.http = HttpListener(options, self.state, self.metrics)
        self.metrics_port: int | None = None
        self._status_updates: set[asyncio.Task] = set()

    @property
    def listeners(self) -> list:
        return [self.grpc] + ([self.http] if self.http is not None else [])

    @property
    def port(self) -> int | None:
        """The gRPC port."""
        return self.grpc.port

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    @property
    def async_engine(self) -> AsyncEngine | None:
        return self.state.engine

    # ---- lifecycle --------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind every listener and the metrics endpoint; they answer "not ready" until :meth:`load` is done."""
        for listener in self.listeners:
            await listener.start()
        if self.options.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(self.options.host, self.options.metrics_port)

    async def load(self, start_engine_core: Callable[[], EngineCoreClient]) -> None:
        """Start the engine core (it loads the model and warms up) on a worker thread, so health checks keep being
        answered, then serve."""
        loop = asyncio.get_running_loop()
        client = await loop.run_in_executor(None, start_engine_core)
        async_engine = AsyncEngine(client, self.options.max_waiting_requests, self.options.stream_interval_ms / 1000,
                                   self.options.max_stream_messages_per_s)
        info = async_engine.info
        self.metrics.describe_engine(info, async_engine.stats())
        async_engine.step_listeners.append(self.metrics.on_step)
        async_engine.death_listeners.append(lambda why: loop.call_soon_threadsafe(self._engine_died))
        self.state.set_engine(async_engine)
        await self._announce(self.state.status)
        log.info("model %s ready: %d KV blocks of %d tokens", info.model_name, info.num_kv_blocks, info.block_size)

    async def drain(self, timeout: float | None = None) -> tuple[int, bool]:
        """Stop taking new requests on every protocol and wait up to ``timeout`` seconds (default: the drain
        timeout) for the in-flight ones, then stop. Returns (requests in flight when the drain began, whether they
        all finished)."""
        in_flight = self.state.start_draining()
        await self._announce(Status.DRAINING)
        finished = await self.state.wait_idle(self.options.drain_timeout if timeout is None else timeout)
        await self.stop()
        return in_flight, finished

    async def stop(self) -> None:
        """Stop serving: calls still running get STOP_GRACE_SECONDS, then are cancelled (aborting their requests)."""
        if self._status_updates:
            await asyncio.gather(*self._status_updates, return_exceptions=True)
        await asyncio.gather(*(listener.stop(STOP_GRACE_SECONDS) for listener in self.listeners))
        if self.state.engine is not None:
            await self.state.engine.shutdown()
        self.metrics.close()

    # ---- status -----------------------------------------------------------------------------------------------
    async def _announce(self, status: Status) -> None:
        for listener in self.listeners:
            await listener.on_status(status)

    def _engine_died(self) -> None:
        """On the server's loop: the engine core cannot serve any more."""
        if self.state.status is not Status.DEAD:
            log.error("the engine core is gone; reporting NOT_SERVING")
            self.state.engine_died()
            task = asyncio.get_running_loop().create_task(self._announce(Status.DEAD))
            self._status_updates.add(task)
            task.add_done_callback(self._status_updates.discard)
