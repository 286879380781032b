"""Chaos requests: misbehaving clients mixed into a run, planned before it starts.

Four kinds, each a way a real client goes wrong:
  cancel     reads a few streamed chunks, then cancels the call (the server must abort and free the blocks)
  deadline   sends a deadline shorter than the generation takes (gRPC: DEADLINE_EXCEEDED; HTTP: the client gives
             up and disconnects, recorded as DEADLINE_EXCEEDED too; either way the request is aborted)
  invalid    sends a sampling parameter out of range (INVALID_ARGUMENT, HTTP 400, before anything is scheduled)
  overlong   sends a prompt longer than the model's context (INVALID_ARGUMENT, HTTP 400)
The check that the server shrugged them off is in ``chaos``.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from glmserve.bench.serve.datasets import FIRST_RANDOM_ID

KINDS = ("cancel", "deadline", "invalid", "overlong")
# Values the server must refuse; one is picked per invalid request.
INVALID_SAMPLING = ({"temperature": -1.0}, {"top_p": 1.5}, {"top_k": -5}, {"n": 0}, {"repetition_penalty": 0.0})
# A deadline this short ends a request of a few dozen tokens mid-generation on a loaded server.
DEADLINE_RANGE_S = (0.02, 0.25)
# Chaos requests generate this many tokens, so a cancel or a deadline has a stream to interrupt.
CHAOS_OUTPUT_LEN = 64


@dataclass(frozen=True)
class Chaos:
    """How one request misbehaves."""

    kind: str
    cancel_after: int = 0                        # cancel: chunks read before cancelling
    timeout_s: float | None = None               # deadline
    sampling: tuple[tuple[str, float], ...] = ()  # invalid: overrides of the request's sampling parameters
    prompt_token_ids: tuple[int, ...] | None = None  # overlong: replaces the prompt


def plan_chaos(num: int, fraction: float, vocab_size: int, max_model_len: int, seed: int) -> list[Chaos | None]:
    """For each of ``num`` requests, how it misbehaves (None: it behaves). Exactly ``round(fraction * num)``
    requests misbehave, the kinds taking turns so each gets its share."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"the chaos fraction must be in [0, 1], got {fraction}")
    rng = random.Random(seed)
    chosen = rng.sample(range(num), round(fraction * num))
    plan: list[Chaos | None] = [None] * num
    for i, index in enumerate(chosen):
        plan[index] = _make(KINDS[i % len(KINDS)], rng, vocab_size, max_model_len)
    return plan


def _make(kind: str, rng: random.Random, vocab_size: int, max_model_len: int) -> Chaos:
    if kind == "cancel":
        # After the first chunk: a stream's first message carries its first token alone, whatever the server's
        # stream interval, so there is always more to cancel (later messages may carry the rest all at once).
        return Chaos(kind, cancel_after=1)
    if kind == "deadline":
        return Chaos(kind, timeout_s=rng.uniform(*DEADLINE_RANGE_S))
    if kind == "invalid":
        return Chaos(kind, sampling=tuple(rng.choice(INVALID_SAMPLING).items()))
    length = max_model_len + rng.randint(1, 64)
    return Chaos(kind, prompt_token_ids=tuple(rng.randrange(FIRST_RANDOM_ID, vocab_size) for _ in range(length)))


def status_counts(outcomes: list[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """{kind: {status code: count}} of (kind, code) pairs, kinds in their usual order."""
    counts: dict[str, Counter] = {kind: Counter() for kind in KINDS}
    for kind, code in outcomes:
        counts[kind][code] += 1
    return {kind: dict(sorted(c.items())) for kind, c in counts.items() if c}


