"""The token bitmask of one sampling step: which tokens each constrained row may take.

Bit ``j`` of word ``w`` in a row allows token ``32 * w + j`` (xgrammar's layout); a cleared bit sets that logit to
-inf before sampling. Rows of free requests are neither filled nor applied, so a batch without constrained
requests costs one pass over its requests and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from glmserve.engine.core.request import Request


@dataclass
class TokenBitmask:
    bits: torch.Tensor      # [B, words] int32 on the CPU; only the constrained rows are filled
    rows: list[int]         # the constrained rows

    def apply(self, logits: torch.Tensor) -> None:
        """Mask ``logits`` [B, V] in place (float32/16, bfloat16; on the CPU or on the bitmask's way to a GPU)."""
        indices = None if len(self.rows) == logits.shape[0] else self.rows
        _apply(logits, self.bits, indices)

    def apply_to_rows(self, row_logits: torch.Tensor) -> None:
        """Mask ``row_logits`` [len(rows), V], the constrained rows gathered, in place."""
        bits = self.bits if len(self.rows) == self.bits.shape[0] else self.bits[self.rows]
        _apply(row_logits, bits, None)


def batch_bitmask(requests: Sequence[Request]) -> TokenBitmask | None:
    """The mask for the requests sampled this step (in that order); None when none is constrained."""
    rows = [i for i, r in enumerate(requests) if r.grammar is not None]
    if not rows:
        return None
    words = requests[rows[0]].grammar.spec.vocab.words
    bits = torch.empty(len(requests), words, dtype=torch.int32)
    view = bits.numpy().view(np.uint32)
    for i in rows:
        request = requests[i]
        request.grammar.fill(bits, view, i, first_token=request.num_output_tokens == 0)
    return TokenBitmask(bits, rows)


def _apply(logits: torch.Tensor, bits: torch.Tensor, indices: list[int] | None) -> None:
    import xgrammar as xgr

    if logits.device != bits.device:
        bits = bits.to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bits, vocab_size=logits.shape[-1], indices=indices)
