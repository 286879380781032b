"""Start-up warm-up of the Triton backend: synthetic batches that launch every kernel variant a server can launch,
so Triton compiles them all before the first request (a compile while serving stalls every running request for
about a second).

A variant is one compiled binary: the kernel, the dtypes, its constexprs and the integers and pointer alignments
Triton specialises on. The kernels leave the integers that change from step to step (split counts, the block
table's width) and the alignment of the per-sequence tables unspecialised, so what varies while serving is:
- decode: one split (written directly) or several (partials and the merge);
- extend: the query tile's token count (``tile_tokens``: powers of two up to where the tile is full), each with
  one split or several;
- the KV write and the merge: one variant each.
Every batch below writes nothing into the KV cache (slot -1) and reads block 0 only.
``tests/kernels/test_compile_count.py`` checks that a run of mixed batches adds no variant after the warm-up.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from glmserve.engine.attention.metadata import AttentionMetadata


@dataclass(frozen=True)
class WarmupStep:
    """A synthetic batch: per sequence its query tokens this step (1 = decode; decodes first) and its length."""

    query_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]


def warmup_steps(num_heads: int, num_kv_heads: int, max_model_len: int) -> list[WarmupStep]:
    """The batches whose forward passes launch every variant: each shape at the shortest context (one split)
    and at ``max_model_len`` (the most splits)."""
    from glmserve.kernels.triton.extend_attention import tile_tokens

    group = num_heads // num_kv_heads
    longest = max(1, max_model_len)
    steps = [WarmupStep((1,), (1,))] + ([WarmupStep((1,), (longest,))] if longest > 1 else [])
    # Extend chunks have 2..longest tokens (a 1-token step of a sequence is a decode); the tile grows with the
    # chunk's length rounded up to a power of two until it is full, so powers of two (and longest) reach them all.
    lengths = sorted({min(2 ** k, longest) for k in range(1, longest.bit_length() + 1)} - {1})
    tiles_seen: set[int] = set()
    for query_len in lengths:
        tile = tile_tokens(group, query_len)
        if tile in tiles_seen:
            continue
        tiles_seen.add(tile)
        steps.append(WarmupStep((query_len,), (query_len,)))
        if longest > query_len:
            steps.append(WarmupStep((query_len,), (longest,)))
    if longest > 1:   # decodes beside an extend chunk in one step (odd row offsets into the per-sequence tables)
        steps.append(WarmupStep((1, 1, 1, 2), (1, longest, 1, 2)))
    return steps


@dataclass
class WarmupBatch:
    positions: torch.Tensor          # [T] int64
    attention: AttentionMetadata


def warmup_batch(step: WarmupStep, block_size: int, device: torch.device) -> WarmupBatch:
    """``step`` as model inputs: every token's K/V slot -1 (no cache write), every block-table entry block 0."""
    positions: list[int] = []
    query_start = [0]
    for q, length in zip(step.query_lens, step.seq_lens):
        positions.extend(range(length - q, length))
        query_start.append(query_start[-1] + q)
    max_blocks = -(-max(step.seq_lens) // block_size)
    i32 = dict(dtype=torch.int32, device=device)
    meta = AttentionMetadata(
        slot_mapping=torch.full((len(positions),), -1, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(query_start, **i32),
        seq_lens=torch.tensor(step.seq_lens, **i32),
        block_tables=torch.zeros(len(step.seq_lens), max_blocks, **i32),
        num_decodes=sum(1 for q in step.query_lens if q == 1),
        max_query_len=max(step.query_lens), max_seq_len=max(step.seq_lens))
    return WarmupBatch(torch.tensor(positions, dtype=torch.int64, device=device), meta)
