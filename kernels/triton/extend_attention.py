"""Triton paged extend attention: query chunks at the end of their sequences, causal, over the paged KV cache.

Same function as ``reference.paged_extend_attention_ref``; one kernel serves full prefill, chunked prefill and
prefix-cache hits (the queries' own K/V are already in the cache). Work layout: one program per
(query tile, sequence, KV head, split). A query tile is BLOCK_T consecutive tokens times the BLOCK_G heads of one
KV group, flattened into the M = BLOCK_T * BLOCK_G rows of ``tl.dot`` (row r = token r // BLOCK_G, head
r % BLOCK_G), so each K/V tile is loaded once for the whole group. A short chunk over a long cached context has
few query tiles (ChatGLM3: 8 tokens a tile), so the keys a tile sees are also cut into ``num_splits`` ranges
(split-KV, ``split_kv.py``, as in decode): each split holding keys writes its partial output and log-sum-exp and
the merge kernel combines them per token. The K/V tile loads are software-pipelined (``extend_num_stages``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmserve.kernels.triton.decode_attention import dot_config
from glmserve.kernels.triton.split_kv import (BLOCK_N, MIN_TILES_PER_SPLIT, choose_num_splits, merge_splits,
                                              split_range)

BLOCK_M = 128   # query rows (tokens x heads of a group) per program
# sm_90, as triton 3.9 compiles them (bench/RESULTS.md): 4 warps spill registers at D=128 with 128 query rows, 8
# do not. The K/V loads get two shared-memory buffers (loads overlapping the tile being multiplied) from 3
# stages with 64 or more query rows, but need 5 with 32 or fewer (ChatGLM3's 2-token tiles), as in decode.
EXTEND_NUM_WARPS = 8


def extend_num_stages(block_t: int, block_g: int) -> int:
    return 5 if block_t * block_g <= 32 else 3
_LOG2E = 1.4426950408889634


def tile_tokens(group: int, max_query_len: int) -> int:
    """BLOCK_T, the query tokens per program: fill BLOCK_M rows (tokens x the group's heads padded to a power of
    two), but no more tokens than the longest chunk, and at least 16 rows for ``tl.dot``. Its values are the
    kernel's compiled variants (the engine's warm-up compiles each)."""
    block_g = triton.next_power_of_2(group)
    block_t = min(max(1, BLOCK_M // block_g), triton.next_power_of_2(max(1, max_query_len)))
    return max(block_t, triton.cdiv(16, block_g))


# Integers that change from step to step are not specialised (another compiled variant while serving), nor is the
# alignment of the per-sequence tables, which the engine slices at any row.
@triton.jit(do_not_specialize=["stride_bt", "num_splits"],
            do_not_specialize_on_alignment=["block_tables_ptr", "query_start_loc_ptr", "seq_lens_ptr"])
def _extend_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    scale_log2e,
    stride_qt, stride_qh,                  # query: [T, H, D]
    stride_ot, stride_oh,                  # out: [T, H, D]
    stride_cb, stride_cs, stride_ch,       # caches: [num_blocks, block_size, KVH, D]
    stride_bt,                             # block_tables: [B, max_blocks]
    part_out_ptr, part_lse_ptr,            # with splits: [T, H, S, D] and [T, H, S] float32
    num_splits,
    BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    MIN_TILES: tl.constexpr, DIRECT: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Highest tiles first: they see the most keys, so starting them early shortens the tail of the launch.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    num_heads = (tl.num_programs(2) // num_splits) * GROUP

    q_start = tl.load(query_start_loc_ptr + seq)
    num_q = tl.load(query_start_loc_ptr + seq + 1) - q_start
    t0 = tile * BLOCK_T
    if t0 >= num_q:     # the grid is sized for the longest chunk in the batch
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - num_q           # tokens cached before this chunk
    # The tile's last token sees keys 0..context_len + last: this split owns a run of those keys (split_kv.py).
    # A split owning none writes nothing (its log-sum-exp rows stay -inf from the host). A row may see no key of
    # its split: its max stays -inf, handled below.
    kv_end = context_len + tl.minimum(t0 + BLOCK_T, num_q)
    kv_start, kv_stop = split_range(kv_end, split, num_splits, BLOCK_N, MIN_TILES)
    if not DIRECT:
        if kv_start >= kv_stop:
            return

    r = tl.arange(0, BLOCK_T * BLOCK_G)
    t = t0 + r // BLOCK_G                   # [M] token index within the chunk
    g = r % BLOCK_G                         # [M] head index within the group
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    d_mask = d < HEAD_DIM
    row_mask = (t < num_q) & (g < GROUP)
    io_mask = row_mask[:, None] & d_mask[None, :]
    token = (q_start + t).to(tl.int64)
    head = kv_head * GROUP + g
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=io_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = context_len + t                 # [M] the rows' positions in the sequence

    m_i = tl.full([BLOCK_T * BLOCK_G], float("-inf"), tl.float32)   # running max (log2 units)
    l_i = tl.zeros([BLOCK_T * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_T * BLOCK_G, BLOCK_D], tl.float32)
    block_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for n0 in range(kv_start, kv_stop, BLOCK_N):
        pos = n0 + n                                                               # [BLOCK_N]
        valid = pos < kv_end
        block = tl.load(block_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        # int64 offsets: one layer's cache can exceed 2^31 elements.
        tok_off = block * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kv_head * stride_ch
        kv_off = tok_off[:, None] + d[None, :]
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2e  # [M, BLOCK_N]
        visible = valid[None, :] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key yet keeps m = -inf; subtracting 0 instead keeps its p and alpha at 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_sub)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if DIRECT:
        tl.store(out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=io_mask)
    else:
        # Partials of token row ``token``, head ``head``: part_out [T, H, S, D], part_lse [T, H, S].
        row = (token * num_heads + head) * num_splits + split                     # [M] int64
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=io_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=row_mask)


def paged_extend_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                           scale: float, max_query_len: int, out: torch.Tensor | None = None,
                           max_seq_len: int | None = None, num_splits: int | None = None) -> torch.Tensor:
    """query: [T, H, D], the sequences' new tokens back to back (``query_start_loc``: [B+1] int32); sequence b's
    queries are its last ``n_b`` tokens, whose K/V are already cached. caches: [num_blocks, block_size, KVH, D];
    block_tables: [B, max_blocks] int32; seq_lens: [B] int32; ``max_query_len`` >= every n_b.
    Returns [T, H, D] (written into ``out`` when given).

    ``num_splits=None`` picks a split count from the number of query-tile programs and the longest context
    (``max_seq_len``, or what the block table can describe), like decode: one split when the query tiles alone
    fill the GPU.
    """
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    if out is None:
        out = torch.empty_like(query)
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0 or max_query_len <= 0:
        return out
    if query.stride(-1) != 1:
        query = query.contiguous()
    group = num_heads // num_kv_heads
    block_g = triton.next_power_of_2(group)
    block_t = tile_tokens(group, max_query_len)
    num_tiles = triton.cdiv(max_query_len, block_t)
    if num_splits is None:
        longest = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
        num_splits = choose_num_splits(num_tiles * num_seqs, num_kv_heads, longest, query.device)
    direct = num_splits == 1
    if direct:
        part_out = part_lse = out   # unused by the kernel
    else:
        part_out = torch.empty(num_tokens, num_heads, num_splits, head_dim, dtype=torch.float32,
                               device=query.device)
        # -inf where no program writes: splits without keys, rows past a chunk's end and padding tokens past
        # query_start_loc[-1]. The merge reads a split's partial output only where its log-sum-exp is finite, so
        # those rows merge to zeros: their part_out rows stay uninitialised and are never read.
        part_lse = torch.full((num_tokens, num_heads, num_splits), float("-inf"), dtype=torch.float32,
                              device=query.device)
    upcast, precision = dot_config(query, k_cache)
    grid = (num_tiles, num_seqs, num_kv_heads * num_splits)
    _extend_kernel[grid](
        query, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        scale * _LOG2E,
        query.stride(0), query.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0),
        part_out, part_lse,
        num_splits,
        BLOCK_SIZE=block_size, GROUP=group, HEAD_DIM=head_dim,
        BLOCK_T=block_t, BLOCK_G=block_g, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=BLOCK_N,
        MIN_TILES=MIN_TILES_PER_SPLIT, DIRECT=direct, UPCAST=upcast, DOT_PRECISION=precision,
        num_warps=EXTEND_NUM_WARPS, num_stages=extend_num_stages(block_t, block_g),
    )
    if not direct:
        merge_splits(part_out, part_lse, out)
    return out
