"""API-key check for every call but health checks: clients send ``authorization: Bearer <key>`` metadata.

Health stays open because load balancers and kubelet probes carry no credentials. A refused call gets
UNAUTHENTICATED from a handler of the same shape as the real one, so it is refused before the request is read.
"""
from __future__ import annotations

import hmac
from typing import Callable

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"
MESSAGE = "missing or wrong API key: send metadata 'authorization: Bearer <key>'"

_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str, on_reject: Callable[[str], None] | None = None):
        self._expected = f"Bearer {api_key}".encode()
        self._on_reject = on_reject   # called with the method's short name, for the gRPC call metrics

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX) or self._authorized(details):
            return handler
        if self._on_reject is not None:
            self._on_reject(details.method.rsplit("/", 1)[-1])
        factory = _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]
        return factory(_refuse, request_deserializer=handler.request_deserializer,
                       response_serializer=handler.response_serializer)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(given, self._expected)   # constant time: no timing oracle
        return False


async def _refuse(request, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, MESSAGE)
