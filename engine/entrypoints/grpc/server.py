"""The gRPC listener of a server: ``glmserve.v1.Generation``, the standard health service and reflection.

The server's lifecycle (engine core, metrics, draining) is owned by ``serving.ModelServer``; this listener binds
its port, follows the server's status with the health service, and stops. The port is bound before the model
loads, so health checks see NOT_SERVING (overall "" and ``glmserve.v1.Generation``) until the weights are loaded
and a warm-up request went through the whole path. A drain flips health to NOT_SERVING for good; a dead engine
core does too (so the liveness probe fails and the pod is restarted).
"""
from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from glmserve.proto import generation_pb2 as pb
from glmserve.proto import generation_pb2_grpc as pb_grpc

from glmserve.engine.entrypoints.grpc.auth import ApiKeyInterceptor
from glmserve.engine.entrypoints.grpc.servicer import GenerationServicer
from glmserve.engine.entrypoints.metrics import ServerMetrics
from glmserve.engine.entrypoints.server_options import ServerOptions
from glmserve.engine.entrypoints.serving_state import ServingState, Status

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Generation"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def grpc_options(opts: ServerOptions) -> list[tuple[str, int]]:
    keepalive_ms = int(opts.keepalive_time_s * 1000)
    return [
        ("grpc.max_send_message_length", opts.max_message_bytes),
        ("grpc.max_receive_message_length", opts.max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Accept client pings down to every 10 s (the client's keepalive), instead of killing the connection.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        # Without this a second server on the same port would bind quietly and share the traffic.
        ("grpc.so_reuseport", 0),
        ("grpc.max_connection_age_ms", int(opts.max_connection_age_s * 1000)),
        ("grpc.max_connection_age_grace_ms", int(max(opts.drain_timeout, 1.0) * 1000)),
    ]


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GrpcListener:
    def __init__(self, options: ServerOptions, state: ServingState, metrics: ServerMetrics):
        self.options = options
        self.health = health.aio.HealthServicer()
        self.servicer = GenerationServicer(state, metrics)
        self.port: int | None = None
        self._metrics = metrics
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        """Bind and serve (health NOT_SERVING, Generation answering UNAVAILABLE until the engine is loaded)."""
        opts = self.options
        interceptors = []
        if opts.api_key:
            interceptors.append(ApiKeyInterceptor(opts.api_key,
                                                  on_reject=lambda m: self._metrics.grpc_request(m, "UNAUTHENTICATED")))
        server = grpc.aio.server(interceptors=interceptors, options=grpc_options(opts))
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

    async def stop(self, grace_s: float) -> None:
        """Stop serving: calls still running get ``grace_s`` seconds, then are cancelled (aborting their
        requests)."""
        if self._server is not None:
            await self._server.stop(grace_s)
            self._server = None

    # ---- health follows the server's status ---------------------------------------------------------------------
    async def on_status(self, status: Status) -> None:
        if status is Status.SERVING:
            await self._set_health(SERVING)
        elif status is Status.DRAINING:
            await self.health.enter_graceful_shutdown()   # NOT_SERVING for good, whatever is set later
        else:
            await self._set_health(NOT_SERVING)

    async def _set_health(self, status) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)
