"""A ModelServer on its own event-loop thread, for programs that embed one (tests, benchmarks).

The caller keeps its own thread (and event loop, if any); coroutines run on the server's loop through :meth:`run`.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Callable

from glmserve.engine.entrypoints.server_options import ServerOptions
from glmserve.engine.entrypoints.serving import ModelServer
from glmserve.engine.runtime.core_client import EngineCoreClient


class ServerThread:
    def __init__(self, options: ServerOptions, start_engine_core: Callable[[], EngineCoreClient],
                 wait_loaded: bool = True):
        """Bind and start serving; the engine core is started (and warmed up) from the server's loop (``loaded`` is
        that future: wait on it when ``wait_loaded`` is False)."""
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="glmserve-server", daemon=True)
        self._thread.start()
        self.server = ModelServer(options)
        self.run(self.server.start())
        self.loaded = asyncio.run_coroutine_threadsafe(self.server.load(start_engine_core), self.loop)
        if wait_loaded:
            self.loaded.result()

    @property
    def target(self) -> str:
        """The gRPC address."""
        return f"127.0.0.1:{self.server.port}"

    @property
    def base_url(self) -> str:
        """The HTTP API's base URL (``.../v1``, as OpenAI clients take it); the server must have an HTTP port."""
        if self.server.http_port is None:
            raise RuntimeError("this server has no HTTP listener (ServerOptions.http_port is None)")
        return f"http://127.0.0.1:{self.server.http_port}/v1"

    def run(self, coro, timeout: float | None = 60):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self.loop.is_running():
            self.run(self.server.stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
