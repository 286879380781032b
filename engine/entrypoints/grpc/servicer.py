"""The ``glmserve.v1.Generation`` handlers: proto in, AsyncEngine, proto out.

Every handler raises plain exceptions; the ``_rpc`` wrapper maps them to a status code (``grpc_errors``), counts
the call by method and code, and tracks the Generate/Chat calls a drain has to wait for. Leaving a request's
engine stream early, for whatever reason (client cancel, deadline, error), aborts the request and frees its
KV blocks before the handler returns.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Callable

import grpc

from glmserve.proto import generation_pb2 as pb
from glmserve.proto import generation_pb2_grpc as pb_grpc

from glmserve.engine.entrypoints.grpc import proto_convert as convert
from glmserve.engine.runtime.async_engine import AsyncEngine, EngineStepError
from glmserve.engine.entrypoints.grpc.deadline import Deadline
from glmserve.engine.entrypoints.grpc.errors import ServiceUnavailable, status_for
from glmserve.engine.entrypoints.llm import merge_delta
from glmserve.engine.entrypoints.metrics import ServerMetrics
from glmserve.engine.core.outputs import CompletionOutput, RequestOutput
from glmserve.engine.text.tool_call import ToolCallParseError, parse_tool_call

log = logging.getLogger(__name__)


def _rpc(*, tracked: bool = False):
    """Map exceptions to status codes and count the call; ``tracked`` calls are waited for by a drain."""
    def decorate(method):
        name = method.__name__

        @functools.wraps(method)
        async def handler(self: "GenerationServicer", request, context: grpc.aio.ServicerContext):
            code = grpc.StatusCode.OK
            if tracked:
                self._enter()
            try:
                return await method(self, request, context)
            except asyncio.CancelledError:   # the client cancelled, or grpc's own deadline fired first
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:  # noqa: BLE001 - every failure becomes a status, see grpc_errors
                code, message = status_for(exc)
                if code is grpc.StatusCode.INTERNAL:
                    log.error("%s failed: %s", name, message, exc_info=not isinstance(exc, EngineStepError))
                    self._check_engine_alive()
                await context.abort(code, message)
            finally:
                self._metrics.grpc_request(name, code.name)
                if tracked:
                    self._leave()
        return handler
    return decorate


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, metrics: ServerMetrics, on_engine_dead: Callable[[], None]):
        self._metrics = metrics
        self._on_engine_dead = on_engine_dead
        self._engine: AsyncEngine | None = None
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # ---- lifecycle (called by the server) -------------------------------------------------------------------
    def set_engine(self, engine: AsyncEngine) -> None:
        self._engine = engine

    def start_draining(self) -> int:
        """Refuse new Generate/Chat calls from now on; returns how many are in flight."""
        self._draining = True
        return self._in_flight

    async def wait_idle(self, timeout: float) -> bool:
        """Whether every in-flight Generate/Chat call finished within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def _enter(self) -> None:
        self._in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    def _ready(self, new_work: bool = False) -> AsyncEngine:
        if self._engine is None:
            raise ServiceUnavailable("the server is starting: the model is not loaded and warmed up yet")
        if new_work and self._draining:
            raise ServiceUnavailable("the server is shutting down and takes no new requests")
        return self._engine

    def _check_engine_alive(self) -> None:
        if self._engine is not None and self._engine.is_dead:
            self._on_engine_dead()

    # ---- handlers -------------------------------------------------------------------------------------------
    @_rpc(tracked=True)
    async def Generate(self, request: pb.GenerateRequest, context) -> None:
        engine = self._ready(new_work=True)
        await self._run(engine, convert.generate_request_from_proto(request, engine.engine.tokenizer), context)

    @_rpc(tracked=True)
    async def Chat(self, request: pb.ChatRequest, context) -> None:
        engine = self._ready(new_work=True)
        await self._run(engine, convert.chat_request_from_proto(request, engine.engine.tokenizer), context)

    @_rpc()
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        engine = self._ready()
        return pb.TokenizeResponse(token_ids=convert.tokenize_from_proto(request, engine.engine.tokenizer))

    @_rpc()
    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        engine = self._ready()
        return pb.AbortResponse(found=engine.abort(request.request_id))

    @_rpc()
    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return convert.model_info_to_proto(self._ready().engine)

    @_rpc()
    async def GetLoad(self, request, context) -> pb.Load:
        return convert.load_to_proto(self._ready().stats())   # counters read without waiting for a step

    # ---- one request --------------------------------------------------------------------------------------
    async def _run(self, engine: AsyncEngine, req: convert.EngineRequest, context) -> None:
        observation_id = engine.engine.tokenizer.special_token_ids["<|observation|>"] if req.chat else None
        async with Deadline(context.time_remaining()):
            stream = await engine.generate(req.request_id, req.prompt_token_ids, req.params, chat=req.chat,
                                           priority=req.priority)
            total = RequestOutput(req.request_id, req.prompt_token_ids,
                                  [CompletionOutput(i) for i in range(req.params.n)], False)
            ends: dict[int, convert.SampleEnd] = {}
            async with contextlib.aclosing(stream):
                async for delta in stream:
                    merge_delta(total, delta)
                    for sample in delta.outputs:
                        end = None
                        if sample.finished:
                            end = ends[sample.index] = _sample_end(total, delta, sample.index, observation_id)
                        if req.stream:
                            await context.write(convert.response_to_proto(req.request_id, sample, end))
            if not req.stream:
                for sample in total.outputs:
                    await context.write(convert.response_to_proto(req.request_id, sample, ends[sample.index]))


def _sample_end(total: RequestOutput, delta: RequestOutput, index: int,
                observation_id: int | None) -> convert.SampleEnd:
    """The closing fields of a finished sample; a chat reply that stopped on <|observation|> and parses as a
    tool call becomes a TOOL_CALL, one that does not parse stays a plain STOP with its text."""
    sample = total.outputs[index]
    reason, tool_call = sample.finish_reason, None
    if observation_id is not None and reason == "stop" and sample.stop_reason == observation_id:
        try:
            tool_call, reason = parse_tool_call(sample.text), "tool_call"
        except ToolCallParseError as exc:
            log.info("request %s stopped on <|observation|> without a valid tool call: %s", total.request_id, exc)
    return convert.SampleEnd(reason, len(total.prompt_token_ids), len(sample.token_ids), delta.num_cached_tokens,
                             delta.metrics, tool_call)
