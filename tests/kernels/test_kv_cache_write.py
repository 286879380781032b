"""write_kv_cache (Triton) against write_kv_cache_ref."""
from __future__ import annotations

import pytest
import torch

from glmserve.kernels.triton.kv_cache_write import write_kv_cache
from glmserve.kernels.reference.attention import write_kv_cache_ref


@pytest.mark.parametrize("block_size, num_kv_heads, head_dim, dtype", [
    (16, 2, 128, torch.float32),
    (32, 2, 128, torch.float16),
    (16, 1, 64, torch.float16),
    (32, 4, 64, torch.float32),
    pytest.param(16, 2, 128, torch.bfloat16, marks=pytest.mark.gpu),
])
def test_write_matches_reference(device, block_size, num_kv_heads, head_dim, dtype):
    num_blocks, num_tokens = 7, 40
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=device).to(dtype)
    v_cache = torch.randn(shape, device=device).to(dtype)
    # Distinct slots scattered over the whole cache, with padding tokens (-1) mixed in.
    slots = torch.randperm(num_blocks * block_size, device=device)[:num_tokens]
    slots[::5] = -1
    # key/value as strided views of one fused projection output, like the model's qkv split.
    qkv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, device=device).to(dtype)
    kv_size = num_kv_heads * head_dim
    key = qkv[:, kv_size:2 * kv_size].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, 2 * kv_size:].view(num_tokens, num_kv_heads, head_dim)

    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(key, value, k_ref, v_ref, slots)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)


def test_write_casts_to_cache_dtype(device):
    k_cache = torch.zeros(2, 16, 2, 64, device=device, dtype=torch.float16)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(5, 2, 64, device=device)
    value = torch.randn(5, 2, 64, device=device)
    slots = torch.tensor([3, -1, 17, 31, 0], device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(key, value, k_ref, v_ref, slots)
    write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)


def test_write_empty_batch(device):
    k_cache = torch.zeros(1, 16, 2, 64, device=device)
    empty = torch.empty(0, 2, 64, device=device)
    write_kv_cache(empty, empty, k_cache, k_cache.clone(), torch.empty(0, dtype=torch.int64, device=device))
    assert not k_cache.any()
