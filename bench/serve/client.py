"""One benchmark request as the client saw it, whatever the protocol: the record, and the sampling every request
asks for.

Nothing here computes a metric; the record keeps raw ``time.perf_counter()`` stamps and counts, and
``serve_metrics`` turns records into figures. The backends (grpc_backend, openai_backend) send the requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from glmserve.bench.serve.chaos_plan import CHAOS_OUTPUT_LEN, Chaos
from glmserve.bench.serve.datasets import BenchPrompt

OK = "OK"
# How a call that the client itself ended is recorded, on every protocol.
CANCELLED = "CANCELLED"                 # we stopped reading (a chaos cancel)
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"  # the call's deadline passed


@dataclass
class RequestRecord:
    """What one request did, as seen by the client."""

    request_id: str
    chaos: str | None                 # the chaos kind, None for a well-behaved request
    start: float                      # perf_counter() when the call was made
    end: float = 0.0                  # perf_counter() when the call ended (any status)
    chunk_times: list[float] = field(default_factory=list)   # arrival of each chunk that carried tokens
    chunk_tokens: list[int] = field(default_factory=list)    # tokens in that chunk
    code: str = OK                    # gRPC status code name, or HTTP status; CANCELLED when we cancelled it
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


def messages_for(prompt: BenchPrompt, history: list[dict]) -> list[dict]:
    """A chat request's messages: the session's history, then the prompt's new turn."""
    return history + [{"role": role, "content": content} for role, content in prompt.messages]
