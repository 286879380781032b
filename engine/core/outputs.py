"""What the engine hands back: typed, protobuf-free results per request, and the one way to put deltas together.

``Engine.step`` emits deltas (each sample's new tokens and text since its previous delta). Every consumer that
wants a whole result (the offline ``LLM``, the servers, the clients, a stream reader that fell behind) folds deltas
with :meth:`RequestOutput.merge` / :meth:`CompletionOutput.extend`, so there is one accumulator.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from glmserve.engine.text.tool_call import ToolCall


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
    finish_reason: str | None = None             # "stop" | "length" | "abort", or "tool_call" (chat); None while running
    stop_reason: int | str | None = None         # the stop token id or stop string that ended it
    logprobs: list[float] | None = None          # log-prob of each chosen token
    top_logprobs: list[list[tuple[int, float]]] | None = None
    tool_call: ToolCall | None = None            # a chat reply that is a tool call (set by the chat layer)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def extend(self, delta: CompletionOutput) -> None:
        """Append a later delta of the same sample: its text, tokens and log-probs, and its closing fields."""
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
            self.top_logprobs = (self.top_logprobs or []) + (delta.top_logprobs or [])
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason
            self.tool_call = delta.tool_call


@dataclass
class RequestOutput:
    """A delta (new tokens and text since the last output) from ``Engine.step``, or a request's accumulated result.

    A delta holds the samples that advanced; an accumulated result holds all n, in index order.
    """

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None

    @classmethod
    def empty(cls, request_id: str, prompt_token_ids: list[int], n: int) -> RequestOutput:
        """The start of an accumulated result: n samples with nothing yet."""
        return cls(request_id, prompt_token_ids, [CompletionOutput(i) for i in range(n)], False)

    def merge(self, delta: RequestOutput) -> None:
        """Fold a later delta of the same request into this result (samples matched by index)."""
        by_index = {out.index: out for out in self.outputs}
        for part in delta.outputs:
            if part.index in by_index:
                by_index[part.index].extend(part)
            else:
                self.outputs.append(part)
                by_index[part.index] = part
        self.num_cached_tokens = delta.num_cached_tokens
        self.metrics = delta.metrics
        self.finished = all(out.finished for out in self.outputs)
