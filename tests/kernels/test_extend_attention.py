"""paged_extend_attention (Triton) against paged_extend_attention_ref: full prefill, chunked prefill and
prefix-cache hits are all "the last n tokens of a sequence attend causally to everything cached before them"."""
from __future__ import annotations

import pytest
import torch

from glmserve.kernels.triton.extend_attention import paged_extend_attention
from glmserve.kernels.reference.attention import paged_extend_attention_ref

# (seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, dtype): query_len == seq_len is a full
# prefill, shorter is a chunk (1, 7 or 64 tokens) over a cached prefix; group sizes 16, 1, 2, 4.
CASES = [
    ([1, 15, 16, 17], [1, 15, 16, 17], 32, 2, 128, 16, torch.float32),
    ([100, 257, 71], [1, 64, 7], 32, 2, 128, 32, torch.float16),
    ([257, 100], [7, 64], 4, 4, 64, 16, torch.float32),
    ([16, 17, 100], [16, 1, 64], 4, 2, 64, 32, torch.float16),
    ([257, 15], [64, 15], 8, 2, 128, 16, torch.float32),
    pytest.param([100, 257], [64, 7], 32, 2, 128, 16, torch.bfloat16, marks=pytest.mark.gpu),
]


def _query_start_loc(query_lens, device):
    loc = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    loc[1:] = torch.tensor(query_lens).cumsum(0)
    return loc.to(device)


def _check_extend(paged_kv, check_close, device, seq_lens, query_lens, num_heads, num_kv_heads, head_dim,
                  block_size, dtype, num_splits=None, seed=0):
    kv = paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, seed=seed)
    query_start_loc = _query_start_loc(query_lens, device)
    query = torch.randn(sum(query_lens), num_heads, head_dim, device=device).to(dtype)
    scale = head_dim ** -0.5
    expected = paged_extend_attention_ref(query, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc,
                                          kv.seq_lens, scale)
    actual = paged_extend_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc, kv.seq_lens,
                                    scale, max(query_lens), num_splits=num_splits)
    check_close(actual, expected)


@pytest.mark.parametrize("seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, dtype", CASES)
def test_extend_matches_reference(paged_kv, check_close, device, seq_lens, query_lens, num_heads, num_kv_heads,
                                  head_dim, block_size, dtype):
    _check_extend(paged_kv, check_close, device, seq_lens, query_lens, num_heads, num_kv_heads, head_dim,
                  block_size, dtype)


def test_extend_loose_max_query_len_and_empty_sequence(paged_kv, check_close, device):
    # max_query_len is only an upper bound; a sequence may contribute no query tokens this step.
    seq_lens, query_lens = [40, 9, 33], [5, 0, 33]
    kv = paged_kv(seq_lens, 2, 64, 16, torch.float32, seed=7)
    query_start_loc = _query_start_loc(query_lens, device)
    query = torch.randn(sum(query_lens), 8, 64, device=device)
    expected = paged_extend_attention_ref(query, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc,
                                          kv.seq_lens, 0.125)
    actual = paged_extend_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc, kv.seq_lens,
                                    0.125, max_query_len=64)
    check_close(actual, expected)


# Split-KV: a short chunk over a long cached context cuts each query tile's keys into ranges; the splits' partial
# outputs merge per token. Splits that get no key for some rows (or none at all) must contribute nothing.
SPLIT_CASES = [
    ([257, 100], [7, 64], 4, 4, 64, 16, torch.float32, 2),
    ([257, 100], [7, 64], 4, 4, 64, 16, torch.float32, 5),
    ([100, 257, 71], [1, 64, 7], 32, 2, 128, 32, torch.float16, 3),
    ([17, 15], [17, 1], 8, 2, 64, 16, torch.float32, 4),        # more splits than KV tiles: empty splits
]


@pytest.mark.parametrize("seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, num_splits",
                         SPLIT_CASES)
def test_extend_split_kv_matches_reference(paged_kv, check_close, device, seq_lens, query_lens, num_heads,
                                           num_kv_heads, head_dim, block_size, dtype, num_splits):
    _check_extend(paged_kv, check_close, device, seq_lens, query_lens, num_heads, num_kv_heads, head_dim,
                  block_size, dtype, num_splits=num_splits, seed=3)


def test_extend_picks_splits_for_a_short_chunk_over_a_long_context(monkeypatch, paged_kv, check_close, device):
    # With a GPU's worth of SMs, one 7-token chunk over 1000 cached tokens is 2 query-tile programs: the automatic
    # choice splits its keys (and the result still equals the reference).
    import glmserve.kernels.triton.extend_attention as extend
    chosen = []
    real_choose = extend.choose_num_splits
    monkeypatch.setattr(extend, "choose_num_splits",
                        lambda *a: chosen.append(real_choose(*a)) or chosen[-1])
    monkeypatch.setattr("glmserve.kernels.triton.split_kv.num_sms", lambda dev: 132)
    kv = paged_kv([1007], 2, 64, 16, torch.float32, seed=5)
    query_start_loc = _query_start_loc([7], device)
    query = torch.randn(7, 8, 64, device=device)
    expected = paged_extend_attention_ref(query, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc,
                                          kv.seq_lens, 0.125)
    actual = paged_extend_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, query_start_loc, kv.seq_lens,
                                    0.125, 7, max_seq_len=1007)
    assert chosen == [8]          # ceil(1007 / 128) tokens-per-split bound; 2 programs alone would want 264
    check_close(actual, expected)
