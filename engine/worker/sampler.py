"""Batched sampling: one token per row from logits [B, V], each row with its own SamplingParams.

Order (the one vLLM uses): padding mask -> grammar bitmask -> min_tokens -> repetition penalty -> presence/frequency
penalties -> greedy rows take the argmax; random rows go through temperature -> top-k -> top-p -> min-p -> an
exponential race. All steps are tensor ops over the whole batch; a step is skipped when no row uses it.

A grammar bitmask (engine/structured) constrains some rows: their disallowed tokens are masked like padding, before
anything else (reported logprobs are those after it). A constrained row skips the min_tokens mask: its grammar
decides where the text ends.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import torch

from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.structured.bitmask import MASKED_LOGIT, TokenBitmask

NEG_INF = float("-inf")


@dataclass
class SamplingRow:
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    # The request's own RNG when it has a seed (on the logits' device); None draws from the global RNG.
    generator: torch.Generator | None = None


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row, None where the row did not ask for logprobs; the whole field is None when no row did.
    logprobs: list[float | None] | None
    top_logprobs: list[list[tuple[int, float]] | None] | None


class Sampler:
    def __init__(self, vocab_size: int, eos_token_id: int) -> None:
        self.vocab_size = vocab_size          # the tokenizer's vocabulary; wider logits columns are padding
        self.eos_token_id = eos_token_id

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                 bitmask: TokenBitmask | None = None) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits must be [len(rows)={len(rows)}, V], got {tuple(logits.shape)}")
        if self._plain_greedy(rows):
            # Nothing to edit: the argmax over the real vocabulary, without copying [B, V] logits (the most common
            # offline case; the copy cost about as much as the argmax).
            if bitmask is None:
                return _output(logits[:, :self.vocab_size].argmax(dim=-1), None, rows)
            return _output(self._constrained_argmax(logits, bitmask), None, rows)
        # A float32 copy, edited in place below (the caller's tensor stays intact); the grammar mask is applied
        # in the same pass.
        logits = logits.to(torch.float32, copy=True) if bitmask is None else bitmask.masked(logits)
        if logits.shape[1] > self.vocab_size:
            logits[:, self.vocab_size:] = NEG_INF
        # Reported logprobs are those of the model (after the padding and grammar masks), not of the processed
        # distribution.
        want_logprobs = any(r.params.logprobs is not None for r in rows)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        if raw_logprobs is not None and bitmask is not None:   # a disallowed token has probability 0: -inf
            raw_logprobs = raw_logprobs.masked_fill(raw_logprobs < MASKED_LOGIT / 2, NEG_INF)
        self._mask_stops_before_min_tokens(logits, rows, set(bitmask.rows) if bitmask is not None else set())
        apply_penalties(logits, rows)
        token_ids = self._choose(logits, rows)
        return _output(token_ids, raw_logprobs, rows)

    @staticmethod
    def _plain_greedy(rows: Sequence[SamplingRow]) -> bool:
        """Every row greedy, without logprobs, penalties or a pending min_tokens: an argmax is the whole job."""
        return all(r.params.is_greedy and r.params.logprobs is None and r.params.repetition_penalty == 1.0
                   and not r.params.presence_penalty and not r.params.frequency_penalty
                   and len(r.output_token_ids) >= r.params.min_tokens for r in rows)

    def _constrained_argmax(self, logits: torch.Tensor, bitmask: TokenBitmask) -> torch.Tensor:
        """Greedy token ids [B] with the bitmask's rows masked; only those rows are copied."""
        if len(bitmask.rows) == logits.shape[0]:
            return bitmask.masked(logits[:, :self.vocab_size]).argmax(dim=-1)
        token_ids = logits[:, :self.vocab_size].argmax(dim=-1)
        token_ids[bitmask.rows] = bitmask.masked_rows(logits[:, :self.vocab_size]).argmax(dim=-1)
        return token_ids

    def _mask_stops_before_min_tokens(self, logits: torch.Tensor, rows: Sequence[SamplingRow],
                                      constrained: set[int]) -> None:
        width = logits.shape[1]
        row_idx: list[int] = []
        col_idx: list[int] = []
        for i, row in enumerate(rows):
            if len(row.output_token_ids) < row.params.min_tokens and i not in constrained:
                # eos is masked even with ignore_eos: harmless there (eos does not end such a row), and one rule.
                banned = {self.eos_token_id, *row.params.stop_token_ids}
                cols = [t for t in banned if 0 <= t < width]
                row_idx += [i] * len(cols)
                col_idx += cols
        if row_idx:
            logits[torch.tensor(row_idx, device=logits.device), torch.tensor(col_idx, device=logits.device)] = NEG_INF

    def _choose(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Token ids [B]: argmax for greedy rows, a random draw for the others."""
        random_rows = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if not random_rows:
            return logits.argmax(dim=-1)
        if len(random_rows) == len(rows):
            return _sample(logits, rows)
        token_ids = logits.argmax(dim=-1)
        idx = torch.tensor(random_rows, device=logits.device)
        token_ids[idx] = _sample(logits[idx], [rows[i] for i in random_rows])
        return token_ids


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Repetition (prompt + output, divide positive / multiply negative logits), presence and frequency (output)."""
    rep = [r.params.repetition_penalty for r in rows]
    presence = [r.params.presence_penalty for r in rows]
    frequency = [r.params.frequency_penalty for r in rows]
    use_rep = any(p != 1.0 for p in rep)
    use_additive = any(presence) or any(frequency)
    if not (use_rep or use_additive):
        return
    device, width = logits.device, logits.shape[1]
    # Only rows that use a penalty contribute tokens: the others' logits are left unchanged anyway.
    penalized_rows = [r != 1.0 or p != 0.0 or f != 0.0 for r, p, f in zip(rep, presence, frequency)]
    output_counts = _token_counts(  # [B, V]
        [r.output_token_ids if use else () for r, use in zip(rows, penalized_rows)], width, device)
    if use_rep:
        prompt_counts = _token_counts(  # [B, V]
            [r.prompt_token_ids if p != 1.0 else () for r, p in zip(rows, rep)], width, device)
        seen = (prompt_counts > 0) | (output_counts > 0)                       # [B, V]
        penalty = torch.tensor(rep, dtype=logits.dtype, device=device)[:, None]  # [B, 1]
        penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
        logits.copy_(torch.where(seen, penalized, logits))
    if use_additive:
        freq = torch.tensor(frequency, dtype=logits.dtype, device=device)[:, None]  # [B, 1]
        pres = torch.tensor(presence, dtype=logits.dtype, device=device)[:, None]   # [B, 1]
        logits -= freq * output_counts + pres * (output_counts > 0).to(logits.dtype)


def _token_counts(token_lists: Sequence[Sequence[int]], width: int, device: torch.device) -> torch.Tensor:
    """[B, width] float: how often each token id occurs in each row's list."""
    lengths = torch.tensor([len(t) for t in token_lists], device=device)
    flat = torch.tensor(list(chain.from_iterable(token_lists)), dtype=torch.long, device=device)
    rows = torch.repeat_interleave(torch.arange(len(token_lists), device=device), lengths)
    counts = torch.zeros(len(token_lists), width, device=device)  # float32 counts are exact up to 2**24
    counts.index_put_((rows, flat), torch.ones_like(flat, dtype=counts.dtype), accumulate=True)
    return counts


def _sample(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Token ids [R] drawn from logits [R, V] of non-greedy rows."""
    width = logits.shape[1]
    device = logits.device
    params = [r.params for r in rows]
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]  # [R, 1]
    logits = logits / temperature  # a fresh tensor: the steps below may edit it in place
    top_k = [p.top_k if 0 < p.top_k < width else width for p in params]
    if any(k < width for k in top_k):
        logits = _top_k(logits, top_k)
    # Top-p needs a full sort, the most expensive step here: only the rows that use it pay for it.
    top_p_rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if len(top_p_rows) == len(rows):
        logits = _top_p(logits, [p.top_p for p in params])
    elif top_p_rows:
        idx = torch.tensor(top_p_rows, device=device)
        logits[idx] = _top_p(logits[idx], [params[i].top_p for i in top_p_rows])
    min_p = [p.min_p for p in params]
    if any(min_p):
        probs = logits.softmax(dim=-1)
        floor = torch.tensor(min_p, device=device)[:, None] * probs.amax(dim=-1, keepdim=True)  # [R, 1]
        logits = logits.masked_fill(probs < floor, NEG_INF)
    probs = logits.softmax(dim=-1)
    return (probs / _exponentials(rows, width, device)).argmax(dim=-1)


def _exponentials(rows: Sequence[SamplingRow], width: int, device: torch.device) -> torch.Tensor:
    """q [R, V] ~ Exp(1) for the exponential race: argmax(p_i / q_i) picks token i with probability p_i.

    Each seeded row draws its own q from its generator, so its tokens depend neither on the other rows of the batch
    nor on its position there; unseeded rows share one draw from the global RNG. q = -log(u) with u ~ U[0, 1) is
    Exp(1) and strictly positive (so p / q is never 0/0 = NaN, which argmax would pick), and on CPU it is about 3x
    faster than Tensor.exponential_.
    """
    u = torch.empty(len(rows), width, device=device)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if len(unseeded) == len(rows):
        u.uniform_()
    elif unseeded:
        u[torch.tensor(unseeded, device=device)] = torch.rand(len(unseeded), width, device=device)
    for i, r in enumerate(rows):
        if r.generator is not None:
            u[i].uniform_(generator=r.generator)
    return u.log_().neg_()


def _top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Mask logits below each row's k-th largest (k = width: off). Ties with the k-th value are kept."""
    width = logits.shape[1]
    k = torch.tensor(top_k, device=logits.device)[:, None]                           # [R, 1]
    k_max = max(x for x in top_k if x < width)
    largest = logits.topk(k_max, dim=-1).values                                      # [R, k_max], descending
    kth = largest.gather(1, k.clamp(max=k_max) - 1)                                  # [R, 1]
    kth = kth.masked_fill(k >= width, NEG_INF)                                       # rows without top-k keep all
    return logits.masked_fill(logits < kth, NEG_INF)


def _top_p(logits: torch.Tensor, top_p: list[float]) -> torch.Tensor:
    """Keep each row's nucleus: the smallest set of most likely tokens whose probability mass reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True, stable=True)     # [S, V] each
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens; 0 for the top one
    drop_sorted = mass_before >= torch.tensor(top_p, device=logits.device)[:, None]
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)         # back to vocabulary order
    return logits.masked_fill(drop, NEG_INF)


def _output(token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None,
            rows: Sequence[SamplingRow]) -> SamplerOutput:
    ids = token_ids.tolist()
    if raw_logprobs is None:
        return SamplerOutput(token_ids=ids, logprobs=None, top_logprobs=None)
    wanted = [r.params.logprobs for r in rows]
    chosen = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1).tolist()
    k_max = min(max(w for w in wanted if w is not None), raw_logprobs.shape[1])
    top_vals, top_ids = raw_logprobs.topk(k_max, dim=-1)  # [B, k_max] each
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    return SamplerOutput(
        token_ids=ids,
        logprobs=[c if w is not None else None for c, w in zip(chosen, wanted)],
        top_logprobs=[list(zip(top_ids[i][:w], top_vals[i][:w])) if w is not None else None
                      for i, w in enumerate(wanted)],
    )
