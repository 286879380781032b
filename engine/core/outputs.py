"""What the engine hands back: typed, protobuf-free results per request."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Monotonic-clock timestamps (seconds) of a request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class CompletionOutput:
    index: int                                   # which of the request's n samples
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None             # "stop" | "length" | "abort"; None while running
    stop_reason: int | str | None = None         # the stop token id or stop string that ended it
    logprobs: list[float] | None = None          # log-prob of each chosen token
    top_logprobs: list[list[tuple[int, float]]] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A delta (new tokens and text since the last output) from ``Engine.step``, or the accumulated result
    from ``LLM.generate``."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
