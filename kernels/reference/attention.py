"""Pure-torch paged attention: the reference every Triton kernel is tested against, and the CPU backend.

KV-cache layout (one layer):  k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
A token's slot is ``block_id * block_size + offset``; a sequence's blocks are listed in its row of ``block_tables``.
Query head h reads KV head ``h // (num_heads // num_kv_heads)`` (grouped-query attention).
Scores and softmax are computed in float32; the output has the query's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Upper bound on the number of float32 score elements one tile materialises (256 MiB), so a 32K-token prompt
# never needs a 32K x 32K matrix.
_SCORE_BUDGET = 64 * 1024 * 1024
# Decode sequences per padded tile: small enough that sorted neighbours have similar lengths (less padding to
# gather and attend over), large enough to keep per-tile overhead low (measured on a 2-core CPU: 8 is ~30% faster
# than one tile for a batch of 48 with lengths 100-700).
_DECODE_GROUP = 8


def write_kv_cache_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """key, value: [T, KVH, D]; slot_mapping: [T] int (-1 = padding, skipped). Writes in place."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = key[valid].to(k_cache.dtype)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = value[valid].to(v_cache.dtype)


def _gather_context(cache: torch.Tensor, block_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached tokens of one sequence: [length, KVH, D] (float32)."""
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache.index_select(0, block_row[:num_blocks].long())
    return blocks.flatten(0, 1)[:length].float()


def paged_decode_attention_ref(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence, attending to all of its ``seq_lens[b]`` cached tokens.

    query: [B, H, D]; block_tables: [B, max_blocks]; seq_lens: [B]. Returns [B, H, D].
    """
    batch, num_heads, head_dim = query.shape
    if batch == 0:
        return query.new_empty(query.shape)
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    # Sequences are gathered into padded [b, L, KVH, D] tiles, a few at a time in order of length, so a tile pads
    # to a length close to its own sequences' (and its size stays bounded).
    order = torch.argsort(seq_lens)
    sorted_lens = seq_lens[order].tolist()
    per_seq = max(1, sorted_lens[-1] * num_kv_heads * head_dim)
    step = max(1, min(_DECODE_GROUP, _SCORE_BUDGET // per_seq))
    for start in range(0, batch, step):
        rows = order[start:start + step]
        n = len(rows)
        num_blocks = (sorted_lens[start + n - 1] + block_size - 1) // block_size   # the tile's longest sequence
        padded_len = num_blocks * block_size
        # index_select of whole blocks (faster on the CPU than advanced indexing plus a cut to the exact
        # length); positions past a sequence's length are masked instead, so a shorter row's unused table
        # entries (0 or -1 padding) only need to be valid indices. [b, KVH, L, D] views.
        blocks = block_tables[rows, :num_blocks].long().clamp_min(0).flatten()
        keys = k_cache.index_select(0, blocks).view(n, padded_len, num_kv_heads, head_dim).float().transpose(1, 2)
        values = v_cache.index_select(0, blocks).view(n, padded_len, num_kv_heads, head_dim).float().transpose(1, 2)
        # The G query heads of a group attend as G query rows over the group's keys.
        q = query[rows].float().view(n, num_kv_heads, group, head_dim)
        visible = torch.arange(padded_len, device=query.device)[None, :] < seq_lens[rows, None]  # [b, L]
        ctx = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible[:, None, None, :], scale=scale)
        out[rows] = ctx.reshape(n, num_heads, head_dim).to(query.dtype)
    return out


def paged_extend_attention_ref(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                               scale: float) -> torch.Tensor:
    """Query chunks at the end of each sequence, attending causally over the paged cache.

    query: [T, H, D] holds the sequences' new tokens back to back (``query_start_loc``: [B+1]). Sequence b's
    queries are its last ``n_b`` tokens (positions ``seq_lens[b]-n_b .. seq_lens[b]-1``); their K/V must already
    be in the cache. Serves full prefill, chunked prefill and prefix-cache hits alike. Returns [T, H, D].
    """
    num_heads = query.shape[1]
    out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for b, length in enumerate(lens):
        q_start, q_end = starts[b], starts[b + 1]
        num_q = q_end - q_start
        if num_q == 0:
            continue
        keys = _gather_context(k_cache, block_tables[b], length).transpose(0, 1)[None]   # [1, KVH, L, D]
        values = _gather_context(v_cache, block_tables[b], length).transpose(0, 1)[None]
        first_pos = length - num_q
        tile = max(1, _SCORE_BUDGET // max(1, num_heads * length))
        for t0 in range(0, num_q, tile):
            t1 = min(num_q, t0 + tile)
            visible = first_pos + t1                                               # keys this tile can see
            q = query[q_start + t0:q_start + t1].float().transpose(0, 1)[None]    # [1, H, t, D]
            # enable_gqa: query head h reads KV head h // G without a copy of K/V per head; on the CPU much faster
            # than folding a group's heads into query rows with a [G*t, l] mask (bench/RESULTS.md, long context).
            if first_pos + t0 == 0:
                # A tile from position 0 sees exactly the square lower triangle: SDPA's own causal mode skips the
                # masked half instead of computing it and masking it.
                ctx = F.scaled_dot_product_attention(q, keys[:, :, :visible], values[:, :, :visible],
                                                     is_causal=True, scale=scale, enable_gqa=True)
            else:
                q_pos = torch.arange(first_pos + t0, first_pos + t1, device=query.device)
                causal = torch.arange(visible, device=query.device)[None, :] <= q_pos[:, None]   # [t, l]
                ctx = F.scaled_dot_product_attention(q, keys[:, :, :visible], values[:, :, :visible],
                                                     attn_mask=causal, scale=scale, enable_gqa=True)  # [1, H, t, D]
            out[q_start + t0:q_start + t1] = ctx[0].transpose(0, 1).to(query.dtype)
    return out
