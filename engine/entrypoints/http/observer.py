"""The outermost layer of the HTTP API (plain ASGI, around the FastAPI app): the API key, the call counter, and
the generation calls a drain waits for.

- Every route but ``/health`` needs ``Authorization: Bearer KEY`` when the server has an API key (probes carry
  no credentials); a call without it gets 401 before its body is read.
- Each call is counted in ``glmserve_http_requests_total{route,status}`` once its response is complete. The route
  is the path of a served route, else ``other`` (a bounded label set). A client that disconnects before its
  response is complete is counted with status ``499`` (nginx's "client closed request"), whatever was sent.
- Calls to the generation routes count as in flight (``ServingState``) until their last byte is sent, streamed
  responses included, so a drain waits for them.
- A request body over ``max_body_bytes`` (``--max-message-bytes``, gRPC's limit too) gets 413 without being held
  in memory: refused on its Content-Length when it declares one, else as soon as the bytes read pass the limit.
  The body is read here, before the app runs, and handed to it whole.
"""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from glmserve.engine.entrypoints.http.errors import error_body
from glmserve.engine.entrypoints.http.streaming import json_body
from glmserve.engine.entrypoints.metrics import ServerMetrics
from glmserve.engine.entrypoints.serving_state import ServingState

GENERATION_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
ROUTES = GENERATION_ROUTES | {"/v1/models", "/health", "/tokenize", "/v1/load_lora_adapter",
                                  "/v1/unload_lora_adapter"}
OPEN_ROUTES = frozenset({"/health"})
CLIENT_CLOSED = "499"
API_KEY_MESSAGE = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024


class _BodyTooLarge(Exception):
    pass


class _ClientLeft(Exception):
    pass


def route_label(path: str) -> str:
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class CallObserver:
    def __init__(self, app: ASGIApp, state: ServingState, metrics: ServerMetrics, api_key: str | None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
        self._app = app
        self._state = state
        self._metrics = metrics
        self._expected = f"Bearer {api_key}".encode() if api_key else None
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        path = scope["path"]
        route = route_label(path)
        status = "500"            # if the app raises before it answers
        complete = disconnected = False

        async def observed_send(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = str(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                complete = True
            await send(message)

        async def observed_receive() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect" and not complete:
                disconnected = True
            return message

        tracked = path in GENERATION_ROUTES
        if tracked:
            self._state.enter()
        try:
            if self._expected is not None and path not in OPEN_ROUTES and not self._authorized(scope):
                await _send_json(observed_send, 401, error_body(API_KEY_MESSAGE, "invalid_request_error", None,
                                                                "invalid_api_key"))
                return
            try:
                body = await self._read_body(scope, observed_receive)
            except _BodyTooLarge:
                await _send_json(observed_send, 413, error_body(
                    f"the request body is larger than this server's limit of {self._max_body_bytes} bytes "
                    "(--max-message-bytes)", "invalid_request_error", None, "request_too_large"))
                return
            except _ClientLeft:
                return
            await self._app(scope, _replay(body, observed_receive), observed_send)
        finally:
            if tracked:
                self._state.leave()
            self._metrics.http_request(route, CLIENT_CLOSED if disconnected and not complete else status)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self._max_body_bytes
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                raise _BodyTooLarge
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientLeft
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _authorized(self, scope: Scope) -> bool:
        for key, value in scope["headers"]:
            if key == b"authorization":
                return hmac.compare_digest(value, self._expected)   # constant time: no timing oracle
        return False


def _replay(body: bytes, receive: Receive) -> Receive:
    """The app's receive: the body read already, whole, then the connection's own messages (a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed


async def _send_json(send: Send, status: int, payload: dict) -> None:
    body = json_body(payload)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
