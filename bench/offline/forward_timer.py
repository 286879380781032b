"""Times the model's own work during a real engine run, to split engine time into model and overhead.

Wrapping ``forward`` and ``compute_logits`` of the runner's model measures exactly the batch shapes the engine ran,
with no replay. On CPU a call returns when its compute is done, so wall time inside the calls is model time; the
rest of the run (scheduling, building the batch tensors, sampling, detokenizing) is engine overhead.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import wraps

import torch


@dataclass
class ForwardTimes:
    forward_seconds: float = 0.0
    logits_seconds: float = 0.0
    num_forward_calls: int = 0      # one per engine step that ran the model
    num_forward_tokens: int = 0     # tokens in those batches (prefill chunks and decodes)

    @property
    def model_seconds(self) -> float:
        return self.forward_seconds + self.logits_seconds


class ForwardTimer:
    """``with ForwardTimer(model) as times:`` accumulates into ``times`` while the block runs."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.times = ForwardTimes()

    def __enter__(self) -> ForwardTimes:
        forward, compute_logits = self.model.forward, self.model.compute_logits
        times = self.times

        @wraps(forward)
        def timed_forward(input_ids: torch.Tensor, positions: torch.Tensor, batch) -> torch.Tensor:
            t0 = time.perf_counter()
            hidden = forward(input_ids, positions, batch)
            times.forward_seconds += time.perf_counter() - t0
            times.num_forward_calls += 1
            times.num_forward_tokens += input_ids.numel()
            return hidden

        @wraps(compute_logits)
        def timed_logits(hidden: torch.Tensor) -> torch.Tensor:
            t0 = time.perf_counter()
            logits = compute_logits(hidden)
            times.logits_seconds += time.perf_counter() - t0
            return logits

        # Instance attributes shadow the class's methods; nn.Module.__call__ looks up self.forward.
        self.model.forward, self.model.compute_logits = timed_forward, timed_logits
        return times

    def __exit__(self, *exc) -> None:
        del self.model.forward, self.model.compute_logits
