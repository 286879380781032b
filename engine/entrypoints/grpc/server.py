"""The gRPC server's lifecycle: listen, start the engine core, serve, drain, stop.

The port is bound before the model loads, so health checks see NOT_SERVING (overall "" and
``glmserve.v1.Generation``) until the weights are loaded and a warm-up request went through the whole path. A
drain flips health to NOT_SERVING for good, refuses new Generate/Chat calls with UNAVAILABLE and waits for the
in-flight ones before the server stops. If the engine core dies, health goes NOT_SERVING for good (so the
liveness probe fails and the pod is restarted) and the calls in flight end with UNAVAILABLE.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from glmserve.proto import generation_pb2 as pb
from glmserve.proto import generation_pb2_grpc as pb_grpc

from glmserve.engine.runtime.async_engine import AsyncEngine
from glmserve.engine.runtime.core_client import EngineCoreClient
from glmserve.engine.entrypoints.metrics import ServerMetrics
from glmserve.engine.entrypoints.grpc.auth import ApiKeyInterceptor
from glmserve.engine.entrypoints.grpc.servicer import GenerationServicer

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Calls still running when a stop is requested get this long to send their final status.
STOP_GRACE_SECONDS = 1.0


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051                    # 0: any free port (see GenerationServer.port)
    metrics_port: int | None = 9090      # 0: any free port; None: no /metrics endpoint
    drain_timeout: float = 30.0
    max_waiting_requests: int | None = None
    api_key: str | None = None
    tls_cert: str | None = None          # PEM files; both or neither
    tls_key: str | None = None
    max_message_bytes: int = 16 * 1024 * 1024
    keepalive_time_s: float = 60.0       # ping idle connections this often, to notice vanished clients
    # Recycle connections this often (GOAWAY), so clients balancing round-robin over a headless Service's pod
    # list re-resolve it and reach replicas added by the autoscaler; in-flight streams get the drain timeout.
    max_connection_age_s: float = 300.0

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.max_message_bytes < 1024:
            raise ValueError(f"--max-message-bytes must be at least 1024, got {self.max_message_bytes}")
        if self.drain_timeout < 0:
            raise ValueError(f"--drain-timeout must be >= 0, got {self.drain_timeout}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ValueError(f"--max-waiting-requests must be >= 0, got {self.max_waiting_requests}")

    def grpc_options(self) -> list[tuple[str, int]]:
        keepalive_ms = int(self.keepalive_time_s * 1000)
        return [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # Accept client pings down to every 10 s (the client's keepalive), instead of killing the connection.
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_pings_without_data", 0),
            # Without this a second server on the same port would bind quietly and share the traffic.
            ("grpc.so_reuseport", 0),
            ("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(max(self.drain_timeout, 1.0) * 1000)),
        ]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GenerationServer:
    def __init__(self, options: ServerOptions):
        self.options = options
        self.metrics = ServerMetrics()
        self.health = health.aio.HealthServicer()
        self.servicer = GenerationServicer(self.metrics)
        self.async_engine: AsyncEngine | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._dead_reported: asyncio.Task | None = None

    # ---- lifecycle --------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Bind and serve (health NOT_SERVING, Generation answering UNAVAILABLE) until :meth:`load` is done."""
        opts = self.options
        interceptors = []
        if opts.api_key:
            interceptors.append(ApiKeyInterceptor(opts.api_key,
                                                  on_reject=lambda m: self.metrics.grpc_request(m, "UNAUTHENTICATED")))
        server = grpc.aio.server(interceptors=interceptors, options=opts.grpc_options())
        pb_grpc.add_GenerationServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
        await self._set_health(NOT_SERVING)
        address = _address(opts.host, opts.port)
        try:
            if opts.tls_cert:
                credentials = grpc.ssl_server_credentials([(Path(opts.tls_key).read_bytes(),
                                                            Path(opts.tls_cert).read_bytes())])
                self.port = server.add_secure_port(address, credentials)
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError:   # grpc says only that binding failed
            self.port = 0
        if not self.port:
            raise OSError(f"cannot listen on {address}: the address is in use or not available here")
        await server.start()
        self._server = server
        if opts.metrics_port is not None:
            self.metrics_port = self.metrics.serve_http(opts.host, opts.metrics_port)

    async def load(self, start_engine_core: Callable[[], EngineCoreClient]) -> None:
        """Start the engine core (it loads the model and warms up) on a worker thread, so health checks keep being
        answered, then serve."""
        loop = asyncio.get_running_loop()
        client = await loop.run_in_executor(None, start_engine_core)
        async_engine = AsyncEngine(client, self.options.max_waiting_requests)
        self.async_engine = async_engine
        info = async_engine.info
        self.metrics.describe_engine(info, async_engine.stats())
        async_engine.step_listeners.append(self.metrics.on_step)
        async_engine.death_listeners.append(lambda why: loop.call_soon_threadsafe(self._engine_died))
        self.servicer.set_engine(async_engine)
        await self._set_health(SERVING)
        log.info("model %s ready: %d KV blocks of %d tokens", info.model_name, info.num_kv_blocks, info.block_size)

    async def drain(self, timeout: float | None = None) -> tuple[int, bool]:
        """Stop taking new requests and wait up to ``timeout`` seconds (default: the drain timeout) for the
        in-flight ones, then stop. Returns (requests in flight when the drain began, whether they all finished)."""
        await self.health.enter_graceful_shutdown()
        in_flight = self.servicer.start_draining()
        finished = await self.servicer.wait_idle(self.options.drain_timeout if timeout is None else timeout)
        await self.stop()
        return in_flight, finished

    async def stop(self) -> None:
        """Stop serving: calls still running get STOP_GRACE_SECONDS, then are cancelled (aborting their requests)."""
        if self._server is not None:
            await self._server.stop(STOP_GRACE_SECONDS)
            self._server = None
        if self.async_engine is not None:
            await self.async_engine.shutdown()
        self.metrics.close()

    # ---- health ---------------------------------------------------------------------------------------------
    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    def _engine_died(self) -> None:
        """On the server's loop: the engine core cannot serve any more."""
        if self._dead_reported is None:
            log.error("the engine core is gone; reporting NOT_SERVING")
            self._dead_reported = asyncio.get_running_loop().create_task(self._set_health(NOT_SERVING))
