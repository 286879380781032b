"""paged_decode_attention (Triton, split-KV) against paged_decode_attention_ref."""
from __future__ import annotations

import pytest
import torch

from glmserve.kernels.triton.decode_attention import choose_num_splits, paged_decode_attention
from glmserve.kernels.reference.attention import paged_decode_attention_ref

# (seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, num_splits): group sizes 16, 1, 2, 4;
# sequences that end inside, at and just past a block; more splits than a short sequence has KV tiles.
CASES = [
    ([1, 15, 16, 17], 32, 2, 128, 16, torch.float32, None),
    ([100, 257], 32, 2, 128, 32, torch.float16, 3),
    ([257, 1], 4, 4, 64, 16, torch.float32, 2),
    ([17, 100], 8, 4, 64, 32, torch.float16, 1),
    ([100, 16, 257], 8, 2, 128, 16, torch.float32, 5),
    pytest.param([15, 257], 32, 2, 128, 16, torch.bfloat16, 2, marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, num_splits", CASES)
def test_decode_matches_reference(paged_kv, check_close, device, seq_lens, num_heads, num_kv_heads, head_dim,
                                  block_size, dtype, num_splits):
    kv = paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype)
    query = torch.randn(len(seq_lens), num_heads, head_dim, device=device).to(dtype)
    scale = head_dim ** -0.5
    expected = paged_decode_attention_ref(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale)
    actual = paged_decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, scale,
                                    num_splits=num_splits)
    check_close(actual, expected)


@pytest.mark.parametrize("num_splits", [1, 2, 4, 8])
def test_decode_split_counts_agree(paged_kv, check_close, device, num_splits):
    kv = paged_kv([257, 100], 2, 128, 16, torch.float32, seed=3)
    query = torch.randn(2, 32, 128, device=device)
    expected = paged_decode_attention_ref(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.1)
    actual = paged_decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.1,
                                    num_splits=num_splits)
    check_close(actual, expected)


def test_decode_strided_query_into_out(paged_kv, check_close, device):
    # The model hands over query as a view of the fused qkv output; out may be a slice of a larger buffer.
    kv = paged_kv([33, 64], 2, 64, 16, torch.float16, seed=5)
    qkv = torch.randn(2, (8 + 4) * 64, device=device).to(torch.float16)
    query = qkv[:, :8 * 64].view(2, 8, 64)
    out = torch.zeros(3, 8, 64, device=device, dtype=torch.float16)
    paged_decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125, num_splits=2,
                           out=out[1:])
    expected = paged_decode_attention_ref(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.125)
    check_close(out[1:], expected)
    assert not out[0].any()


def test_choose_num_splits_fills_the_device():
    cpu = torch.device("cpu")
    assert choose_num_splits(64, 2, 100, cpu) == 1                  # short contexts never split
    long_single = choose_num_splits(1, 2, 32768, cpu)
    assert long_single > 1
    assert choose_num_splits(64, 2, 32768, cpu) <= long_single      # big batches need fewer splits


@pytest.mark.gpu
def test_decode_cache_beyond_int32_offsets(device):
    # One layer's cache larger than 2^31 elements: blocks at the far end need 64-bit address arithmetic.
    block_size, kv_heads, head_dim = 16, 2, 128
    num_blocks = (2 ** 31) // (block_size * kv_heads * head_dim) + 64
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, head_dim, device=device, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    seq_len = 40
    tail = torch.arange(num_blocks - 3, num_blocks, device=device)
    k_cache[tail] = torch.randn(3, block_size, kv_heads, head_dim, device=device).half()
    v_cache[tail] = torch.randn(3, block_size, kv_heads, head_dim, device=device).half()
    block_tables = tail.int()[None, :]
    seq_lens = torch.tensor([seq_len], dtype=torch.int32, device=device)
    query = torch.randn(1, 32, head_dim, device=device).half()
    expected = paged_decode_attention_ref(query, k_cache, v_cache, block_tables, seq_lens, head_dim ** -0.5)
    actual = paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, head_dim ** -0.5, num_splits=2)
    torch.testing.assert_close(actual, expected, atol=2e-3, rtol=2e-3)
