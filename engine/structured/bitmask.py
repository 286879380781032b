"""The token bitmask of one sampling step: which tokens each constrained row may take.

Bit ``j`` of word ``w`` in a row allows token ``32 * w + j`` (xgrammar's layout); a cleared bit sets that logit to
-inf before sampling. A batch without constrained requests costs one pass over its requests and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from glmserve.engine.core.request import Request

# What a disallowed logit becomes on the CPU: far below any real logit (exp underflows to exactly 0 in a softmax),
# yet finite, so that adding it to an allowed logit's 0 bit costs no NaN.
MASKED_LOGIT = -1e30


@dataclass
class TokenBitmask:
    bits: torch.Tensor      # [B, words] int32 on the CPU; rows of free requests allow everything
    rows: list[int]         # the constrained rows

    def masked(self, logits: torch.Tensor) -> torch.Tensor:
        """A float32 copy of ``logits`` [B, V] in which the disallowed tokens cannot be sampled.

        On the CPU the mask is folded into the copy the sampler makes anyway: one ``add`` of MASKED_LOGIT times
        the unpacked "disallowed" bits (about the cost of the copy; xgrammar's in-place kernel, and torch's
        ``where``/``masked_fill`` with a bool mask, cost 10-20 copies on a [64, 65024] batch). A disallowed logit is
        then MASKED_LOGIT rather than -inf: probability exactly 0 after softmax, never an argmax. On a GPU it is
        xgrammar's kernel (-inf) on the copy.
        """
        if logits.device.type == "cpu":
            return torch.add(logits.float(), self._disallowed(self.bits, logits.shape[-1]), alpha=MASKED_LOGIT)
        out = logits.to(torch.float32, copy=True)
        import xgrammar as xgr
        xgr.apply_token_bitmask_inplace(out, self.bits.to(out.device, non_blocking=True), vocab_size=out.shape[-1],
                                        indices=None if len(self.rows) == out.shape[0] else self.rows)
        return out

    def masked_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """``masked`` of the constrained rows only: [len(rows), V]."""
        sub = TokenBitmask(self.bits[self.rows], list(range(len(self.rows))))
        return sub.masked(logits[self.rows])

    @staticmethod
    def _disallowed(bits: torch.Tensor, width: int) -> torch.Tensor:
        """[B, width] uint8, 1 where the token is not allowed (bit j of word w is token 32 * w + j)."""
        inverted = np.invert(bits.numpy().view(np.uint8))
        return torch.from_numpy(np.unpackbits(inverted, axis=1, bitorder="little"))[:, :width]


def batch_bitmask(requests: Sequence[Request]) -> TokenBitmask | None:
    """The mask for the requests sampled this step (in that order); None when none is constrained."""
    rows = [i for i, r in enumerate(requests) if r.grammar is not None]
    if not rows:
        return None
    words = requests[rows[0]].grammar.spec.vocab.words
    bits = torch.full((len(requests), words), -1, dtype=torch.int32)
    view = bits.numpy().view(np.uint32)
    for i in rows:
        request = requests[i]
        request.grammar.fill(bits, view, i, first_token=request.num_output_tokens == 0)
    return TokenBitmask(bits, rows)
