"""One request's state inside the engine, with integer accounting.

``num_computed_tokens`` catches up with ``num_tokens``: a fresh prompt, a chunked prefill, a prefix-cache hit and
a recompute after preemption are all the same thing, a request whose computed count is behind its token count.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from glmserve.engine.core.adapters import AdapterBinding
from glmserve.engine.core.sampling_params import SamplingParams

# One sequence of the engine: (the client's request id, which of its n samples). Samples are tracked by their
# request's id and their index, so a request id may contain any character.
RequestKey = tuple[str, int]


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"          # eos, a stop token id or a stop string
    LENGTH = "length"      # max_tokens or the model's context length
    ABORT = "abort"        # aborted by the client, a deadline or an engine fault


class GrammarState(Protocol):
    """A constrained request's grammar (engine/structured): the scheduler admits the request only once the
    grammar is compiled."""

    @property
    def is_ready(self) -> bool: ...


@dataclass
class RequestTimes:
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


@dataclass(eq=False)
class Request:
    request_id: str                        # the client's id, shared by the request's n samples
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0                      # lower runs first (FCFS within a priority)
    arrival_time: float = field(default_factory=time.monotonic)
    index: int = 0                         # which of the request's n samples this is
    adapter: AdapterBinding | None = None  # the fine-tune (LoRA or P-tuning) it runs under; None: the base model

    def __post_init__(self) -> None:
        self.key: RequestKey = (self.request_id, self.index)
        self.token_ids: list[int] = list(self.prompt_token_ids)   # prompt + output, grows by one per decode
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0         # prompt tokens served from the prefix cache on first admission
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        self.times = RequestTimes(arrival=self.arrival_time)
        # The request's own RNG when it has a seed, created on the model's device by the runner.
        self.generator: torch.Generator | None = None
        self.stop_ids = frozenset(self.params.stop_token_ids)
        # The matcher of a structured-output request, set by the engine; None for free text.
        self.grammar: GrammarState | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def finish(self, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        self.status = RequestStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.times.finished = time.monotonic()
