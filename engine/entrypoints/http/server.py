"""The HTTP listener of a server: uvicorn serving the HTTP API on the server's own event loop (beside gRPC).

The port is bound here, before the model loads (``/health`` answers 503 until the server is serving), so a port
that is taken fails the start with one line, and port 0 tells which port it got. uvicorn runs as a task of the
loop; it installs no signal handlers (the server's lifecycle owns SIGTERM). Stopping gives the responses still
being written ``grace_s`` seconds, then cancels them (their engine requests are aborted).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from glmserve.engine.entrypoints.http.app import build_app
from glmserve.engine.entrypoints.metrics import ServerMetrics
from glmserve.engine.entrypoints.server_options import ServerOptions
from glmserve.engine.entrypoints.serving_state import ServingState, Status

BACKLOG = 2048
KEEP_ALIVE_S = 30        # idle keep-alive connections are closed after this (clients reconnect transparently)


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        """The server's lifecycle handles the signals (a drain), not uvicorn."""
        yield


class HttpListener:
    def __init__(self, options: ServerOptions, state: ServingState, metrics: ServerMetrics):
        self.options = options
        self.app = build_app(state, metrics, options.api_key, options.served_model_name, options.max_message_bytes)
        self.port: int | None = None
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        opts = self.options
        sock = _bind(opts.host, opts.http_port)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, lifespan="off", log_config=None, access_log=False,
                                log_level=logging.getLogger().getEffectiveLevel(), backlog=BACKLOG,
                                timeout_keep_alive=KEEP_ALIVE_S, ssl_certfile=opts.tls_cert, ssl_keyfile=opts.tls_key,
                                server_header=False)
        self._server = _Server(config)
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():   # failed to start (a bad TLS file, ...): raise what it raised
                self._task.result()
                raise OSError("the HTTP listener stopped while starting")
            await asyncio.sleep(0.005)

    async def on_status(self, status: Status) -> None:
        """Nothing to do: the routes read the serving state on every call."""

    async def stop(self, grace_s: float) -> None:
        if self._server is None:
            return
        server, task = self._server, self._task
        self._server = self._task = None
        server.config.timeout_graceful_shutdown = grace_s
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _bind(host: str, port: int) -> socket.socket:
    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} (HTTP): {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock
