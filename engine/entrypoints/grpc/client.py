"""Python clients of the gRPC API: :class:`GenerationClient` (blocking) and :class:`AsyncGenerationClient`.

    with GenerationClient("localhost:50051") as client:
        for chunk in client.generate("Hello", max_tokens=32, temperature=0):
            print(chunk.text, end="")

``generate`` and ``chat`` return iterators of :class:`Chunk` (one per response message); leaving the iteration
early cancels the call, which aborts the request on the server. Sampling parameters are keyword arguments with
the names of ``SamplingParams`` (temperature, top_p, max_tokens, stop, ...); the ones not given take the
server's defaults. Failed calls raise ``grpc.RpcError`` (``.code()``, ``.details()``).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import AsyncIterator, Iterable, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from glmserve.proto import generation_pb2 as pb
from glmserve.proto import generation_pb2_grpc as pb_grpc

from glmserve.engine.core.outputs import CompletionOutput
from glmserve.engine.text.chat_format import ChatMessage
from glmserve.engine.text.tool_call import ToolCall

FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length",
                  pb.FINISH_REASON_ABORT: "abort", pb.FINISH_REASON_TOOL_CALL: "tool_call"}
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class Timings:
    """Seconds from the request's arrival at the engine."""

    queue_time: float
    time_to_first_token: float
    total_time: float


@dataclass
class Chunk(CompletionOutput):
    """One response message: a delta when streaming, a sample's whole result otherwise. A sample's output as the
    engine gives it (index, text, token_ids, logprobs, finish_reason "stop" | "length" | "abort" | "tool_call",
    tool_call), plus what the last message of a sample carries."""

    request_id: str = ""
    usage: Usage | None = None
    timings: Timings | None = None

    def extend(self, delta: CompletionOutput) -> None:
        super().extend(delta)
        if isinstance(delta, Chunk) and delta.finished:
            self.usage, self.timings = delta.usage, delta.timings


@dataclass
class ModelInfo:
    model: str
    max_model_len: int
    vocab_size: int
    block_size: int
    dtype: str
    num_kv_blocks: int


@dataclass
class Load:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int


def collect(chunks: Iterable[Chunk]) -> list[Chunk]:
    """The samples of a streamed (or unary) response, each put together into one Chunk, by index."""
    samples: dict[int, Chunk] = {}
    for chunk in chunks:
        samples.setdefault(chunk.index, Chunk(chunk.index, request_id=chunk.request_id)).extend(chunk)
    return [samples[i] for i in sorted(samples)]


# ---- request building and response parsing (shared by both clients) ---------------------------------------------
def _sampling(kwargs: dict) -> pb.SamplingParams:
    """Sampling keyword arguments; structured output as json_schema (JSON text or a dict), json_object, regex,
    choice (a list of strings) or grammar."""
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("json_schema"), dict):
        kwargs["json_schema"] = json.dumps(kwargs["json_schema"], ensure_ascii=False)
    if isinstance(kwargs.get("choice"), (list, tuple)):
        kwargs["choice"] = pb.ChoiceList(choices=kwargs["choice"])
    try:
        return pb.SamplingParams(**kwargs)
    except ValueError as exc:   # protobuf's message for an unknown field name
        raise TypeError(f"unknown sampling parameter: {exc}") from None


def _tool_choice(tool_choice) -> pb.ToolChoice | None:
    """"auto", "required", or the tool to call as {"name": ...} or OpenAI's {"type": "function", "function": {...}}."""
    if tool_choice is None:
        return None
    if isinstance(tool_choice, str):
        return pb.ToolChoice(mode=tool_choice)
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function", tool_choice)
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return pb.ToolChoice(function=function["name"])
    raise TypeError(f"tool_choice must be 'auto', 'required' or {{'name': TOOL}}, got {tool_choice!r}")


def _generate_request(prompt, prompt_token_ids, stream, request_id, priority, sampling,
                      adapter: str = "") -> pb.GenerateRequest:
    if (prompt is None) == (prompt_token_ids is None):
        raise TypeError("pass exactly one of prompt or prompt_token_ids")
    request = pb.GenerateRequest(request_id=request_id, sampling=_sampling(sampling), stream=stream,
                                 priority=priority, adapter=adapter)
    if prompt is not None:
        request.prompt = prompt
    else:   # set even when empty, so the server reports an empty prompt rather than a missing one
        request.prompt_token_ids.CopyFrom(pb.TokenIds(ids=prompt_token_ids))
    return request


def _messages(messages: Iterable[ChatMessage | dict]) -> list[pb.ChatMessage]:
    result = []
    for m in messages:
        if isinstance(m, ChatMessage):
            m = {"role": m.role, "content": m.content, "metadata": m.metadata}
        result.append(pb.ChatMessage(**m))
    return result


def _tools(tools) -> str | None:
    return tools if tools is None or isinstance(tools, str) else json.dumps(tools, ensure_ascii=False)


def _chat_request(messages, tools, stream, request_id, priority, sampling, adapter: str = "",
                  tool_choice=None) -> pb.ChatRequest:
    return pb.ChatRequest(request_id=request_id, messages=_messages(messages), tools=_tools(tools),
                          sampling=_sampling(sampling), stream=stream, priority=priority, adapter=adapter,
                          tool_choice=_tool_choice(tool_choice))


def _tokenize_request(text, messages, tools) -> pb.TokenizeRequest:
    if (text is None) == (messages is None):
        raise TypeError("pass exactly one of text or messages")
    if text is not None:
        return pb.TokenizeRequest(text=text)
    return pb.TokenizeRequest(chat=pb.Conversation(messages=_messages(messages), tools=_tools(tools)))


def _chunk(msg: pb.GenerateResponse) -> Chunk:
    chunk = Chunk(msg.index, msg.text, list(msg.token_ids), request_id=msg.request_id)
    if msg.logprobs:
        chunk.logprobs = [e.logprob for e in msg.logprobs]
        chunk.top_logprobs = [[(t.token_id, t.logprob) for t in e.top] for e in msg.logprobs]
    if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
        chunk.finish_reason = FINISH_REASONS[msg.finish_reason]
        u, t = msg.usage, msg.timings
        chunk.usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)
        chunk.timings = Timings(t.queue_time, t.time_to_first_token, t.total_time)
        if msg.HasField("tool_call"):
            chunk.tool_call = ToolCall(msg.tool_call.name, json.loads(msg.tool_call.arguments_json))
    return chunk


def _model_info(msg: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(msg.model, msg.max_model_len, msg.vocab_size, msg.block_size, msg.dtype, msg.num_kv_blocks)


def _load(msg: pb.Load) -> Load:
    return Load(msg.num_running, msg.num_waiting, msg.kv_cache_usage, msg.num_free_blocks, msg.num_total_blocks)


def _channel_args(target: str, tls: bool, root_certificates: bytes | None, max_message_bytes: int):
    options = [("grpc.max_send_message_length", max_message_bytes),
               ("grpc.max_receive_message_length", max_message_bytes),
               # Pings on idle connections notice a dead server; the server accepts one every 10 s at most.
               ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 20_000)]
    if target.startswith("dns:"):
        # A DNS name of several replicas (a Kubernetes headless Service): spread calls over all of them rather
        # than pinning every call to the first address (grpc's default pick_first policy).
        options.append(("grpc.lb_policy_name", "round_robin"))
    credentials = grpc.ssl_channel_credentials(root_certificates) if tls or root_certificates else None
    return target, credentials, options


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


SERVING = health_pb2.HealthCheckResponse.ServingStatus.Name(health_pb2.HealthCheckResponse.SERVING)


# ---- the clients --------------------------------------------------------------------------------------------------
class _ClientChannel:
    """What both clients share: the channel (plain or TLS), the stubs, the API-key metadata, the default deadline.
    ``grpc_module`` is ``grpc`` (blocking) or ``grpc.aio``."""

    def __init__(self, grpc_module, target: str, *, api_key: str | None, tls: bool,
                 root_certificates: bytes | None, timeout: float | None, max_message_bytes: int):
        target, credentials, options = _channel_args(target, tls, root_certificates, max_message_bytes)
        self._channel = (grpc_module.secure_channel(target, credentials, options) if credentials
                         else grpc_module.insecure_channel(target, options))
        self._stub = pb_grpc.GenerationStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = _metadata(api_key)
        self._timeout = timeout

    def _call(self, method, request, timeout):
        return method(request, timeout=timeout or self._timeout, metadata=self._metadata)


class GenerationClient(_ClientChannel):
    """Blocking client. ``tls`` (or ``root_certificates``, PEM bytes) for a TLS server; ``api_key`` is sent as
    ``authorization: Bearer <key>``; ``timeout`` (seconds) is the default deadline of every call."""

    def __init__(self, target: str, *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        super().__init__(grpc, target, api_key=api_key, tls=tls, root_certificates=root_certificates,
                         timeout=timeout, max_message_bytes=max_message_bytes)

    def generate(self, prompt: str | None = None, *, prompt_token_ids: list[int] | None = None, stream: bool = True,
                 request_id: str = "", priority: int = 0, timeout: float | None = None, adapter: str = "",
                 **sampling) -> Iterator[Chunk]:
        request = _generate_request(prompt, prompt_token_ids, stream, request_id, priority, sampling, adapter)
        return _iterate(self._call(self._stub.Generate, request, timeout))

    def chat(self, messages: Iterable[ChatMessage | dict], *, tools=None, stream: bool = True, request_id: str = "",
             priority: int = 0, timeout: float | None = None, adapter: str = "", tool_choice=None,
             **sampling) -> Iterator[Chunk]:
        """``tools``: a list/dict (sent as JSON) or a JSON string; ``tool_choice``: "auto", "required" or
        {"name": TOOL}."""
        request = _chat_request(messages, tools, stream, request_id, priority, sampling, adapter, tool_choice)
        return _iterate(self._call(self._stub.Chat, request, timeout))

    def tokenize(self, text: str | None = None, *, messages=None, tools=None,
                 timeout: float | None = None) -> list[int]:
        return list(self._call(self._stub.Tokenize, _tokenize_request(text, messages, tools), timeout).token_ids)

    def abort(self, request_id: str, timeout: float | None = None) -> bool:
        return self._call(self._stub.Abort, pb.AbortRequest(request_id=request_id), timeout).found

    def model_info(self, timeout: float | None = None) -> ModelInfo:
        return _model_info(self._call(self._stub.GetModelInfo, pb.ModelInfoRequest(), timeout))

    def load(self, timeout: float | None = None) -> Load:
        return _load(self._call(self._stub.GetLoad, pb.LoadRequest(), timeout))

    def load_adapter(self, name: str, path: str, kind: int = 0, timeout: float | None = None) -> pb.AdapterInfo:
        """Load a LoRA adapter or a P-tuning v2 checkpoint (a folder on the server) under ``name``."""
        return self._call(self._stub.LoadAdapter, pb.LoadAdapterRequest(name=name, path=path, kind=kind), timeout)

    def unload_adapter(self, name: str, timeout: float | None = None) -> None:
        self._call(self._stub.UnloadAdapter, pb.UnloadAdapterRequest(name=name), timeout)

    def list_adapters(self, timeout: float | None = None) -> list[pb.AdapterInfo]:
        return list(self._call(self._stub.ListAdapters, pb.ListAdaptersRequest(), timeout).adapters)

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """"SERVING", "NOT_SERVING", ... (grpc.health.v1 status names)."""
        reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout or self._timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Block until health says SERVING (the model is loaded and warmed up)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(timeout=max(0.1, deadline - time.monotonic())) == SERVING:
                    return
            except grpc.RpcError:
                pass   # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server was not SERVING within {timeout}s")
            time.sleep(0.1)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GenerationClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _iterate(call) -> Iterator[Chunk]:
    try:
        for msg in call:
            yield _chunk(msg)
    finally:
        call.cancel()   # a no-op once the call is done; otherwise it aborts the request on the server


class AsyncGenerationClient(_ClientChannel):
    """The asyncio twin of :class:`GenerationClient` (without ``wait_ready``): ``generate``/``chat`` return async
    iterators, the other calls are coroutines."""

    def __init__(self, target: str, *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, timeout: float | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        super().__init__(grpc.aio, target, api_key=api_key, tls=tls, root_certificates=root_certificates,
                         timeout=timeout, max_message_bytes=max_message_bytes)

    def generate(self, prompt: str | None = None, *, prompt_token_ids: list[int] | None = None, stream: bool = True,
                 request_id: str = "", priority: int = 0, timeout: float | None = None, adapter: str = "",
                 **sampling) -> AsyncIterator[Chunk]:
        request = _generate_request(prompt, prompt_token_ids, stream, request_id, priority, sampling, adapter)
        return _aiterate(self._call(self._stub.Generate, request, timeout))

    def chat(self, messages: Iterable[ChatMessage | dict], *, tools=None, stream: bool = True, request_id: str = "",
             priority: int = 0, timeout: float | None = None, adapter: str = "", tool_choice=None,
             **sampling) -> AsyncIterator[Chunk]:
        request = _chat_request(messages, tools, stream, request_id, priority, sampling, adapter, tool_choice)
        return _aiterate(self._call(self._stub.Chat, request, timeout))

    async def tokenize(self, text: str | None = None, *, messages=None, tools=None,
                       timeout: float | None = None) -> list[int]:
        reply = await self._call(self._stub.Tokenize, _tokenize_request(text, messages, tools), timeout)
        return list(reply.token_ids)

    async def abort(self, request_id: str, timeout: float | None = None) -> bool:
        return (await self._call(self._stub.Abort, pb.AbortRequest(request_id=request_id), timeout)).found

    async def model_info(self, timeout: float | None = None) -> ModelInfo:
        return _model_info(await self._call(self._stub.GetModelInfo, pb.ModelInfoRequest(), timeout))

    async def load(self, timeout: float | None = None) -> Load:
        return _load(await self._call(self._stub.GetLoad, pb.LoadRequest(), timeout))

    async def health(self, service: str = "", timeout: float | None = None) -> str:
        reply = await self._health.Check(health_pb2.HealthCheckRequest(service=service),
                                         timeout=timeout or self._timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncGenerationClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def _aiterate(call) -> AsyncIterator[Chunk]:
    try:
        async for msg in call:
            yield _chunk(msg)
    finally:
        call.cancel()
