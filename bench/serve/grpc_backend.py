"""The gRPC backend: glmserve's own API (Generate, Chat, Tokenize, GetLoad, health)."""
from __future__ import annotations

import contextlib
import time

import grpc

from glmserve.engine.entrypoints.grpc.client import AsyncGenerationClient

from glmserve.bench.serve.backend import BenchError, Load, ServedModel
from glmserve.bench.serve.chaos_plan import Chaos
from glmserve.bench.serve.client import CANCELLED, RequestRecord, messages_for, sampling_for
from glmserve.bench.serve.datasets import BenchPrompt


class GrpcBackend:
    name = "grpc"
    load_source = "GetLoad"
    poll_interval_s = 0.05   # a loopback GetLoad costs well under a millisecond of server time

    def __init__(self, client: AsyncGenerationClient, target: str = ""):
        self.client = client
        self.target = target
        self._prefix_len: int | None = None

    @classmethod
    def connect(cls, target: str, api_key: str | None) -> "GrpcBackend":
        return cls(AsyncGenerationClient(target, api_key=api_key), target)

    async def close(self) -> None:
        await self.client.close()

    async def model_info(self) -> ServedModel:
        try:
            info = await self.client.model_info(timeout=30)
        except grpc.RpcError as exc:
            raise BenchError(f"cannot get the model info from {self.target}: {exc.code().name}: "
                             f"{exc.details()}") from None
        return ServedModel(info.model, info.max_model_len, info.vocab_size)

    async def count_prompt_tokens(self, messages: list[dict]) -> int:
        return len(await self.client.tokenize(messages=messages))

    async def count_text_tokens(self, text: str) -> int:
        # Tokenize puts [gMASK] sop before a text: what the empty text has is not the text's.
        if self._prefix_len is None:
            self._prefix_len = len(await self.client.tokenize(""))
        return len(await self.client.tokenize(text)) - self._prefix_len

    async def health(self) -> str:
        return await self.client.health(timeout=5)

    async def load(self) -> Load | None:
        return await self.client.load(timeout=5)

    async def send(self, request_id: str, prompt: BenchPrompt, history: list[dict], temperature: float,
                   chaos: Chaos | None = None, structured: dict | None = None) -> RequestRecord:
        """Send ``prompt`` (after ``history``, for a multiturn session) and record the streamed reply."""
        client = self.client
        sampling = sampling_for(prompt, temperature, chaos, structured)
        timeout = chaos.timeout_s if chaos is not None else None
        start = time.perf_counter()   # the call starts as soon as generate()/chat() is called
        token_ids = chaos.prompt_token_ids if chaos is not None and chaos.prompt_token_ids else prompt.prompt_token_ids
        if token_ids is not None:
            stream = client.generate(prompt_token_ids=list(token_ids), request_id=request_id, timeout=timeout,
                                     **sampling)
        else:
            stream = client.chat(messages_for(prompt, history), request_id=request_id, timeout=timeout, **sampling)
        record = RequestRecord(request_id, chaos.kind if chaos else None, start, prompt_len=prompt.prompt_len or 0)
        cancel_after = chaos.cancel_after if chaos is not None and chaos.kind == "cancel" else None
        text = []
        try:
            # aclosing: leaving the loop early must cancel the call now, not when the generator is collected.
            async with contextlib.aclosing(stream):
                async for chunk in stream:
                    now = time.perf_counter()
                    if chunk.token_ids:
                        record.chunk_times.append(now)
                        record.chunk_tokens.append(len(chunk.token_ids))
                    text.append(chunk.text)
                    if chunk.usage is not None:
                        record.prompt_len = chunk.usage.prompt_tokens
                    if cancel_after is not None and len(record.chunk_times) >= cancel_after and not chunk.finished:
                        record.code, record.error = CANCELLED, "cancelled by the client"
                        break
        except grpc.RpcError as exc:
            record.code, record.error = exc.code().name, exc.details() or ""
        record.end = time.perf_counter()
        record.reply = "".join(text)
        return record


def as_backend(target) -> "GrpcBackend":
    """A backend as it is, or a gRPC client (``AsyncGenerationClient``) as the gRPC backend."""
    return target if hasattr(target, "send") else GrpcBackend(target)
