"""The HTTP API's routes: OpenAI's chat and completions, the model list, health, and vLLM's ``/tokenize`` and
``/v1/load_lora_adapter`` / ``/v1/unload_lora_adapter``.

Each generation call: the server must be serving (503 otherwise), the model known (404), the request valid (400,
naming the field); then its engine requests are submitted (429 when the waiting queue is full), and the answer is
streamed or returned whole. Whatever ends the call, its engine requests are closed: one that has not finished is
aborted and its KV blocks freed.
"""
from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, Callable

from fastapi import APIRouter, Request
from fastapi.responses import Response

from glmserve.engine.entrypoints.http import chat_api, completions_api
from glmserve.engine.entrypoints.http.chat_api import chat_messages, chat_tools
from glmserve.engine.entrypoints.http.errors import ApiError, bad_request, error_body, error_for
from glmserve.engine.entrypoints.http.logprobs import TokenText
from glmserve.engine.core.adapters import AdapterKind
from glmserve.engine.entrypoints.http.protocol import (ChatCompletionRequest, CompletionRequest, LoadLoraAdapterRequest,
                                                       TokenizeRequest, UnloadLoraAdapterRequest)
from glmserve.engine.entrypoints.http.streaming import ClientDisconnected, EventStream, json_body, until_disconnect
from glmserve.engine.entrypoints.serving_state import ServingState, Status

REQUEST_ID_HEADER = "x-request-id"
_ADAPTER_FIELDS = {"adapter": "lora_name", "adapter_path": "lora_path"}
MAX_REQUEST_ID_CHARS = 256
CLIENT_CLOSED = 499
_UNAVAILABLE = {
    Status.STARTING: "the server is starting: the model is not loaded and warmed up yet",
    Status.DRAINING: "the server is shutting down and takes no new requests",
    Status.DEAD: "the engine has failed; the server serves no more requests",
}


def json_response(payload: dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_body(payload), status, headers, media_type="application/json")


def error_response(error: ApiError, headers: dict[str, str] | None = None) -> Response:
    headers = dict(headers or {})
    if error.status in (429, 503):
        headers["retry-after"] = "1"
    return json_response(error_body(error.message, error.type, error.param, error.code), error.status, headers)


class Routes:
    """The handlers, bound to one server's state."""

    def __init__(self, state: ServingState, served_model_name: str | None):
        self.state = state
        self._served_model_name = served_model_name
        self._token_text: TokenText | None = None
        self._created = int(time.time())

    def router(self) -> APIRouter:
        router = APIRouter()
        router.add_api_route("/health", self.health, methods=["GET"])
        router.add_api_route("/v1/models", self.models, methods=["GET"])
        router.add_api_route("/v1/models/{model_id:path}", self.model, methods=["GET"])
        router.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"])
        router.add_api_route("/v1/completions", self.completions, methods=["POST"])
        router.add_api_route("/tokenize", self.tokenize, methods=["POST"])
        router.add_api_route("/v1/load_lora_adapter", self.load_lora_adapter, methods=["POST"])
        router.add_api_route("/v1/unload_lora_adapter", self.unload_lora_adapter, methods=["POST"])
        return router

    # ---- helpers ------------------------------------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self._served_model_name or self.state.ready().info.model_name

    def check_model(self, model: str | None) -> tuple[str, str | None]:
        """(the model the response names, the fine-tune to run or None): the served model, or a loaded adapter by
        its name (as the inference gateways' model-server protocol asks of a server that serves adapters)."""
        name = self.model_name
        if model is None or model == name:
            return name, None
        adapters = self.state.ready().adapters
        if model in adapters:
            return model, model
        served = ", ".join(repr(n) for n in [name, *adapters])
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {served}", "model",
                       code="model_not_found")

    @property
    def token_text(self) -> TokenText:
        if self._token_text is None:
            self._token_text = TokenText(self.state.ready().tokenizer)
        return self._token_text

    def _model_cards(self) -> list[dict]:
        """The served model, then each loaded fine-tune (``parent``: the served model)."""
        engine = self.state.ready()
        info = engine.info
        base = {"id": self.model_name, "object": "model", "created": self._created, "owned_by": "glmserve",
                "root": info.model_name, "parent": None, "max_model_len": info.max_model_len,
                "vocab_size": info.vocab_size}
        return [base] + [{**base, "id": name, "parent": self.model_name} for name in engine.adapters]

    # ---- routes -------------------------------------------------------------------------------------------------
    async def health(self) -> Response:
        """200 only while serving: a readiness probe takes the pod out of the pool while it loads or drains."""
        if self.state.serving:
            return json_response({"status": "serving"})
        status = Status.DEAD if self.state.engine is not None and self.state.engine.is_dead else self.state.status
        return error_response(ApiError(503, _UNAVAILABLE[status], type="service_unavailable",
                                       code="service_unavailable"))

    async def models(self) -> Response:
        try:
            return json_response({"object": "list", "data": self._model_cards()})
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error response
            return error_response(error_for(exc))

    async def model(self, model_id: str) -> Response:
        try:
            name, _ = self.check_model(model_id)
            return json_response(next(card for card in self._model_cards() if card["id"] == name))
        except Exception as exc:  # noqa: BLE001
            return error_response(error_for(exc))

    async def chat_completions(self, body: ChatCompletionRequest, request: Request) -> Response:
        return await self._generate(request, bool(body.stream), chat_api.field_names(body),
                                    lambda rid, model, adapter: chat_api.chat_call(
                                        body, self.state, rid, model, self.token_text, adapter), body.model,
            chat_api.complete, chat_api.stream)

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        return await self._generate(request, bool(body.stream), completions_api.field_names(body),
                                    lambda rid, model, adapter: completions_api.completion_call(
                                        body, self.state, rid, model, self.token_text, adapter), body.model,
            completions_api.complete, completions_api.stream)

    async def tokenize(self, body: TokenizeRequest) -> Response:
        """vLLM's ``/tokenize``: ``{"prompt": text}`` or ``{"messages": [...], "tools"?: [...]}`` to the prompt's
        token ids, as the completion or chat would run them."""
        try:
            engine = self.state.ready()
            self.check_model(body.model)
            if (body.prompt is None) == (body.messages is None):
                raise bad_request("prompt", "prompt: send either prompt or messages")
            if body.prompt is not None:
                ids = engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
            else:
                tools = chat_tools(body.tools)
                ids = self.state.chat.prompt(chat_messages(body.messages), tools)
            return json_response({"count": len(ids), "max_model_len": engine.info.max_model_len, "tokens": ids})
        except Exception as exc:  # noqa: BLE001
            return error_response(error_for(exc, {"prompt": "messages"} if body.messages else None))

    async def load_lora_adapter(self, body: LoadLoraAdapterRequest) -> Response:
        """vLLM's route: load a fine-tune under a name; requests then name it in ``model``. Answers in plain text,
        as vLLM does (errors in OpenAI's JSON shape)."""
        try:
            engine = self.state.ready(new_work=True)
            if not body.lora_name.strip() or body.lora_name == self.model_name:
                raise bad_request("lora_name", f"lora_name: {body.lora_name!r} cannot name a fine-tune "
                                               "(empty, or the served model's own name)")
            kind = None if body.kind is None else AdapterKind(body.kind)
            await engine.load_adapter(body.lora_name, body.lora_path, kind)
            return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.", media_type="text/plain")
        except Exception as exc:  # noqa: BLE001
            return error_response(error_for(exc, _ADAPTER_FIELDS))

    async def unload_lora_adapter(self, body: UnloadLoraAdapterRequest) -> Response:
        """Refused (409) while requests still use it, as over gRPC (FAILED_PRECONDITION)."""
        try:
            await self.state.ready().unload_adapter(body.lora_name)
            return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", media_type="text/plain")
        except Exception as exc:  # noqa: BLE001
            return error_response(error_for(exc, _ADAPTER_FIELDS))

    # ---- one generation call ------------------------------------------------------------------------------------
    async def _generate(self, request: Request, stream: bool, field_names: dict[str, str],
                        make_call: Callable, model: str | None, complete: Callable,
                        events: Callable[..., AsyncIterator[bytes]]) -> Response:
        headers: dict[str, str] = {}
        try:
            self.state.ready(new_work=True)
            request_id = _request_id(request)
            headers[REQUEST_ID_HEADER] = request_id
            call = make_call(request_id, *self.check_model(model))
            await call.generation.start()
        except Exception as exc:  # noqa: BLE001 - every failure becomes an error response
            return error_response(error_for(exc, field_names), headers)
        if stream:
            return EventStream(events(call), call.generation.close, headers)
        try:
            payload = await until_disconnect(complete(call), request.receive)
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)   # nobody reads it; the call is counted as 499
        except Exception as exc:  # noqa: BLE001
            return error_response(error_for(exc, field_names), headers)
        finally:
            await call.generation.close()
        return json_response(payload, headers=headers)


def _request_id(request: Request) -> str:
    """The client's ``X-Request-Id`` (the engine request's id, as the gRPC API's request_id), or a fresh one."""
    given = request.headers.get(REQUEST_ID_HEADER)
    if not given:
        return uuid.uuid4().hex
    if len(given) > MAX_REQUEST_ID_CHARS or not given.isprintable():
        raise bad_request(None, f"X-Request-Id: must be at most {MAX_REQUEST_ID_CHARS} printable characters")
    return given
