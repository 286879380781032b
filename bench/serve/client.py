"""One benchmark request on the wire: send it, stream the reply, stamp each chunk's arrival.

Nothing here computes a metric; the record keeps raw ``time.perf_counter()`` stamps and counts, and
``serve_metrics`` turns records into figures.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import grpc

from glmserve.engine.entrypoints.grpc.client import AsyncGenerationClient

from glmserve.bench.serve.chaos import CHAOS_OUTPUT_LEN, Chaos
from glmserve.bench.serve.datasets import BenchPrompt

OK = "OK"


@dataclass
class RequestRecord:
    """What one request did, as seen by the client."""

    request_id: str
    chaos: str | None                 # the chaos kind, None for a well-behaved request
    start: float                      # perf_counter() when the call was made
    end: float = 0.0                  # perf_counter() when the call ended (any status)
    chunk_times: list[float] = field(default_factory=list)   # arrival of each chunk that carried tokens
    chunk_tokens: list[int] = field(default_factory=list)    # tokens in that chunk
    code: str = OK                    # gRPC status code name; CANCELLED when we cancelled it ourselves
    error: str = ""
    prompt_len: int = 0               # as the server counted it (usage), else as planned
    reply: str = ""                   # the streamed text (a multiturn session's next history entry)

    @property
    def ok(self) -> bool:
        return self.code == OK

    @property
    def output_len(self) -> int:
        return sum(self.chunk_tokens)


def sampling_for(prompt: BenchPrompt, temperature: float, chaos: Chaos | None,
                 structured: dict | None = None) -> dict:
    """Exactly ``output_len`` tokens: max and min tokens pin the length (min_tokens masks the chat stop tokens
    too), and eos is ignored. A structured request (well-behaved ones only) ends earlier if its grammar is
    complete."""
    output_len = CHAOS_OUTPUT_LEN if chaos is not None else prompt.output_len
    sampling = {"max_tokens": output_len, "min_tokens": output_len, "ignore_eos": True, "temperature": temperature}
    if chaos is not None:
        sampling.update(chaos.sampling)
    elif structured:
        sampling.update(structured)
    return sampling


async def send(client: AsyncGenerationClient, request_id: str, prompt: BenchPrompt, history: list[dict],
               temperature: float, chaos: Chaos | None = None, structured: dict | None = None) -> RequestRecord:
    """Send ``prompt`` (after ``history``, for a multiturn session) and record the streamed reply.

    Never raises for a failed call: the status lands in the record, so one bad request cannot stop a run.
    """
    sampling = sampling_for(prompt, temperature, chaos, structured)
    timeout = chaos.timeout_s if chaos is not None else None
    start = time.perf_counter()   # the call starts as soon as generate()/chat() is called
    token_ids = chaos.prompt_token_ids if chaos is not None and chaos.prompt_token_ids else prompt.prompt_token_ids
    if token_ids is not None:
        stream = client.generate(prompt_token_ids=list(token_ids), request_id=request_id, timeout=timeout,
                                 **sampling)
    else:
        messages = history + [{"role": role, "content": content} for role, content in prompt.messages]
        stream = client.chat(messages, request_id=request_id, timeout=timeout, **sampling)
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
                    record.code, record.error = grpc.StatusCode.CANCELLED.name, "cancelled by the client"
                    break
    except grpc.RpcError as exc:
        record.code, record.error = exc.code().name, exc.details() or ""
    record.end = time.perf_counter()
    record.reply = "".join(text)
    return record
