"""Triton paged decode attention: one query token per sequence over its paged KV cache (flash-decoding).

Same function as ``reference.paged_decode_attention_ref``. Work layout:
- one program per (sequence, KV head, split): it loads the query rows of every head of that KV group as one
  [BLOCK_G, D] tile (ChatGLM3: 16 heads per group fill a 16-row ``tl.dot``; smaller groups are padded with masked
  rows), so each K/V tile is read once for the whole group;
- the context is cut into ``num_splits`` ranges of whole KV tiles (split-KV), so a small batch with a long context
  still fills the GPU; each split writes its partial output and log-sum-exp, and a second kernel merges the splits.
With one split the first kernel writes the final output directly.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

BLOCK_N = 64                 # KV tokens per tile
MIN_TOKENS_PER_SPLIT = 256   # below this a split's fixed cost (query load, partial write, merge) dominates
MAX_SPLITS = 128
_LOG2E = 1.4426950408889634


@triton.jit
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
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    # This split's token range: an equal share of the sequence's KV tiles (may be empty for short sequences).
    seq_len = tl.load(seq_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + g
    d_mask = d < HEAD_DIM
    q_mask = (g < GROUP)[:, None] & d_mask[None, :]
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

    # An empty split (or an empty sequence) has l_i == 0: it contributes zeros with weight 0.
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if DIRECT:
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        # Partials: part_out [B, H, S, D] and part_lse [B, H, S] (float32, contiguous).
        row = (seq * num_heads + heads) * num_splits + split                       # [BLOCK_G]
        tl.store(part_out_ptr + row.to(tl.int64)[:, None] * HEAD_DIM + d[None, :], o, mask=q_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g < GROUP)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_ob, stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (sequence, head): a log-sum-exp weighted sum of the splits' normalised outputs.
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row0 = (seq * tl.num_programs(1) + head) * num_splits
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    lse = tl.load(part_lse_ptr + row0 + s, mask=s_mask, other=float("-inf"))     # [BLOCK_S], log2 units
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)    # every split empty: all weights become 0
    w = tl.exp2(lse - m)
    total = tl.sum(w, 0)
    w = w / tl.where(total > 0, total, 1.0)
    mask = s_mask[:, None] & (d < HEAD_DIM)[None, :]
    parts = tl.load(part_out_ptr + (row0 + s).to(tl.int64)[:, None] * HEAD_DIM + d[None, :], mask=mask, other=0.0)
    o = tl.sum(parts * w[:, None], 0)                                             # [BLOCK_D]
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4   # the CPU interpreter runs programs one by one: few splits keep tests fast


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Split count that gives about two programs per SM, keeping at least MIN_TOKENS_PER_SPLIT tokens a split."""
    programs = max(1, batch * num_kv_heads)
    wanted = math.ceil(2 * _num_sms(torch.device(device)) / programs)
    useful = math.ceil(max(1, max_seq_len) / MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_SPLITS))


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

    ``num_splits=None`` picks a split count from the batch size and the longest context the block table can
    describe (``max_blocks * block_size``), which needs no device-to-host sync.
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
        DIRECT=direct,
        UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=8,   # 4 warps spill registers with 64-token tiles at D=128 (ptxas, sm_90)
    )
    if not direct:
        merge_splits(part_out, part_lse, out)
    return out


def merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor) -> None:
    """part_out: [R, H, S, D] float32 (each split's normalised output), part_lse: [R, H, S] (log2 units, -inf for
    an empty split) -> out [R, H, D]: per row and head, the log-sum-exp weighted sum of the splits."""
    rows, num_heads, num_splits, head_dim = part_out.shape
    _merge_splits_kernel[(rows, num_heads)](
        part_out, part_lse, out,
        out.stride(0), out.stride(1),
        num_splits,
        HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
