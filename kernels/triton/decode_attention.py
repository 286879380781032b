"""Triton paged decode attention: one query token per sequence over its paged KV cache (flash-decoding).

Same function as ``reference.paged_decode_attention_ref``. Work layout:
- one program per (sequence, KV head, split): it loads the query rows of every head of that KV group as one
  [BLOCK_G, D] tile (ChatGLM3: 16 heads per group fill a 16-row ``tl.dot``; smaller groups are padded with masked
  rows), so each K/V tile is read once for the whole group;
- the context is cut into at most ``num_splits`` key ranges (split-KV, ``split_kv.py``), so a small batch with a
  long context still fills the GPU; each split holding keys writes its partial output and log-sum-exp, and the
  merge kernel combines them. With one split the kernel writes the final output directly.
- the K/V tile loads are software-pipelined (``NUM_STAGES``): the next tile's copy into shared memory is in flight
  while the current one is multiplied, so one program keeps memory busy instead of waiting on every load.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from glmserve.kernels.triton.split_kv import (BLOCK_N, MIN_TILES_PER_SPLIT, choose_num_splits, merge_splits,
                                              split_range)

__all__ = ["paged_decode_attention", "choose_num_splits", "dot_config", "DECODE_NUM_WARPS", "DECODE_NUM_STAGES"]

# sm_90, as triton 3.9 compiles them (bench/RESULTS.md): 8 warps take 74 registers, no spills; 5 stages are the
# fewest that give the loop two K/V buffers (the block-table load feeding the K/V addresses takes stages of its
# own: 3 or 4 leave one buffer, no overlap), 70.5 KB of shared memory, so three programs fit an SM.
DECODE_NUM_WARPS = 8
DECODE_NUM_STAGES = 5
_LOG2E = 1.4426950408889634


# Integers that change from step to step are not specialised (a value of 1 or a multiple of 16 would otherwise
# compile another variant while serving), nor is the alignment of the per-sequence tables, which the engine
# slices at any row.
@triton.jit(do_not_specialize=["stride_bt", "num_splits"],
            do_not_specialize_on_alignment=["block_tables_ptr", "seq_lens_ptr"])
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2e,
    stride_qb, stride_qh,                  # query: [B, H, D]
    stride_ob, stride_oh,                  # out: [B, H, D]
    stride_cb, stride_cs, stride_ch,       # caches: [num_blocks, block_size, KVH, D]
    stride_bt,                             # block_tables: [B, max_blocks]
    num_splits,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MIN_TILES: tl.constexpr,
    DIRECT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + g
    d_mask = d < HEAD_DIM
    q_mask = (g < GROUP)[:, None] & d_mask[None, :]
    # Partials: part_out [B, H, S, D] and part_lse [B, H, S] (float32, contiguous).
    part_row = (seq * num_heads + heads).to(tl.int64) * num_splits + split               # [BLOCK_G]

    seq_len = tl.load(seq_lens_ptr + seq)
    start, end = split_range(seq_len, split, num_splits, BLOCK_N, MIN_TILES)
    if not DIRECT:
        if start >= end:
            # No key here (a short sequence, or a CUDA-graph step's fixed split count): -inf tells the merge to
            # skip this split's output, which is never written.
            tl.store(part_lse_ptr + part_row, tl.full([BLOCK_G], float("-inf"), tl.float32), mask=g < GROUP)
            return

    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)   # running max of the scores (log2 units)
    l_i = tl.zeros([BLOCK_G], tl.float32)                  # running softmax denominator
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    block_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for tile_start in range(start, end, BLOCK_N):
        pos = tile_start + n                                                       # [BLOCK_N]
        valid = pos < end
        block = tl.load(block_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        # int64 offsets: one layer's cache can exceed 2^31 elements.
        tok_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        kv_off = tok_off[:, None] + d[None, :]                                     # [BLOCK_N, BLOCK_D]
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e  # [BLOCK_G, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty sequence has l_i == 0: its output is zeros.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if DIRECT:
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        tl.store(part_out_ptr + part_row[:, None] * HEAD_DIM + d[None, :], o, mask=q_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + part_row, lse, mask=g < GROUP)


def dot_config(query: torch.Tensor, k_cache: torch.Tensor) -> tuple[bool, str]:
    """(upcast, input_precision) for the kernels' ``tl.dot``s.

    Half-precision inputs go to the tensor cores as they are, accumulating in fp32. The CPU interpreter has no
    bf16 arithmetic, so there (and for fp32 or mixed dtypes) tiles are upcast to fp32 right after loading and
    multiplied in full precision ("ieee", not tf32).
    """
    upcast = (os.environ.get("TRITON_INTERPRET") == "1" or query.dtype != k_cache.dtype
              or query.dtype == torch.float32)
    return upcast, "ieee" if upcast else "tf32"


def paged_decode_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           num_splits: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """query: [B, H, D]; caches: [num_blocks, block_size, KVH, D]; block_tables: [B, max_blocks] int32;
    seq_lens: [B] int32. Returns [B, H, D] (written into ``out`` when given).

    ``num_splits`` is an upper bound (each sequence uses as many as its length fills, ``split_kv.py``);
    ``None`` picks one from the batch size and the longest context the block table can describe
    (``max_blocks * block_size``), which needs no device-to-host sync.
    """
    batch, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    if out is None:
        out = torch.empty_like(query)
    if batch == 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = choose_num_splits(batch, num_kv_heads, block_tables.shape[1] * block_size, query.device)

    direct = num_splits == 1
    if direct:
        part_out = part_lse = out   # unused by the kernel
    else:
        part_out = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=query.device)

    upcast, precision = dot_config(query, k_cache)
    block_d = triton.next_power_of_2(head_dim)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens,
        out, part_out, part_lse,
        scale * _LOG2E,
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        num_splits,
        BLOCK_SIZE=block_size, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=BLOCK_N,
        MIN_TILES=MIN_TILES_PER_SPLIT, DIRECT=direct,
        UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=DECODE_NUM_WARPS, num_stages=DECODE_NUM_STAGES,
    )
    if not direct:
        merge_splits(part_out, part_lse, out)
    return out
