"""The attention metadata of one forward pass: how a flat batch of tokens maps onto the paged KV cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """A flat batch of T tokens from B sequences; decode sequences (one token each) come first."""

    slot_mapping: torch.Tensor      # [T] int64: cache slot of each token's K/V (-1 = padding, not written)
    query_start_loc: torch.Tensor   # [B+1] int32: tokens of sequence b are [start[b], start[b+1])
    seq_lens: torch.Tensor          # [B] int32: context length including this step's tokens
    block_tables: torch.Tensor      # [B, max_blocks] int32: the blocks of each sequence, in order
    num_decodes: int                # sequences [0, num_decodes) have exactly one query token
    max_query_len: int
    max_seq_len: int
