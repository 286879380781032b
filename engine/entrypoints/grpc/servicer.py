"""The ``glmserve.v1.Generation`` handlers: proto in, AsyncEngine, proto out.

Every handler raises plain exceptions; the ``_rpc`` wrapper maps them to a status code (``grpc_errors``), counts
the call by method and code, and tracks the Generate/Chat calls a drain has to wait for (in the server's
``ServingState``, shared with the HTTP frontend). Leaving a request's
engine stream early, for whatever reason (client cancel, deadline, error), aborts the request and frees its
KV blocks before the handler returns.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

import grpc

from glmserve.proto import generation_pb2 as pb
from glmserve.proto import generation_pb2_grpc as pb_grpc

from glmserve.engine.core.errors import EngineStepError
from glmserve.engine.core.outputs import RequestOutput
from glmserve.engine.entrypoints.chat import ChatTemplate
from glmserve.engine.entrypoints.grpc import proto_convert as convert
from glmserve.engine.entrypoints.grpc.deadline import Deadline
from glmserve.engine.entrypoints.grpc.errors import status_for
from glmserve.engine.entrypoints.metrics import ServerMetrics
from glmserve.engine.entrypoints.serving_state import ServingState
from glmserve.engine.runtime.async_engine import AsyncEngine

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
                await context.abort(code, message)
            finally:
                self._metrics.grpc_request(name, code.name)
                if tracked:
                    self._leave()
        return handler
    return decorate


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, state: ServingState, metrics: ServerMetrics):
        self._state = state          # shared with the other frontends of the server: engine, draining, in flight
        self._metrics = metrics

    def _enter(self) -> None:
        self._state.enter()

    def _leave(self) -> None:
        self._state.leave()

    def _ready(self, new_work: bool = False) -> AsyncEngine:
        return self._state.ready(new_work)

    @property
    def _chat(self) -> ChatTemplate:
        return self._state.chat

    # ---- handlers -------------------------------------------------------------------------------------------
    @_rpc(tracked=True)
    async def Generate(self, request: pb.GenerateRequest, context) -> None:
        engine = self._ready(new_work=True)
        await self._run(engine, convert.generate_request_from_proto(request, engine.tokenizer), context)

    @_rpc(tracked=True)
    async def Chat(self, request: pb.ChatRequest, context) -> None:
        engine = self._ready(new_work=True)
        await self._run(engine, convert.chat_request_from_proto(request, self._chat), context)

    @_rpc()
    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        self._ready()
        return pb.TokenizeResponse(token_ids=convert.tokenize_from_proto(request, self._chat))

    @_rpc()
    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        engine = self._ready()
        return pb.AbortResponse(found=engine.abort(request.request_id))

    @_rpc()
    async def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return convert.model_info_to_proto(self._ready().info)

    @_rpc()
    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context) -> pb.AdapterInfo:
        engine = self._ready(new_work=True)
        name, path, kind = convert.load_adapter_from_proto(request)
        info = await engine.load_adapter(name, path, kind)
        log.info("loaded adapter %r (%s) from %s", name, info.kind.value, path)
        return convert.adapter_info_to_proto(info)

    @_rpc()
    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context) -> pb.UnloadAdapterResponse:
        engine = self._ready()
        await engine.unload_adapter(request.name)
        log.info("unloaded adapter %r", request.name)
        return pb.UnloadAdapterResponse()

    @_rpc()
    async def ListAdapters(self, request, context) -> pb.ListAdaptersResponse:
        infos = self._ready().adapters.values()
        return pb.ListAdaptersResponse(adapters=[convert.adapter_info_to_proto(i) for i in infos])

    @_rpc()
    async def GetLoad(self, request, context) -> pb.Load:
        return convert.load_to_proto(self._ready().stats())   # counters read without waiting for a step

    # ---- one request --------------------------------------------------------------------------------------
    async def _run(self, engine: AsyncEngine, req: convert.EngineRequest, context) -> None:
        async with Deadline(context.time_remaining()):
            stream = await engine.generate(req.request_id, req.prompt_token_ids, req.params, priority=req.priority,
                                           adapter=req.adapter)
            total = RequestOutput.empty(req.request_id, req.prompt_token_ids, req.params.n)
            ends: dict[int, convert.SampleEnd] = {}
            async with contextlib.aclosing(stream):
                async for delta in stream:
                    total.merge(delta)
                    for sample in delta.outputs:
                        end = None
                        if sample.finished:
                            end = ends[sample.index] = self._sample_end(total, delta, sample.index, req.chat)
                        if req.stream:
                            await context.write(convert.response_to_proto(req.request_id, sample, end))
            if not req.stream:
                for sample in total.outputs:
                    await context.write(convert.response_to_proto(req.request_id, sample, ends[sample.index]))

    def _sample_end(self, total: RequestOutput, delta: RequestOutput, index: int, chat: bool) -> convert.SampleEnd:
        result = total.outputs[index]
        if chat:
            self._chat.finish(result, total.request_id)
        return convert.SampleEnd(result, len(total.prompt_token_ids), delta.num_cached_tokens, delta.metrics)
