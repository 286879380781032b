"""add_lora (Triton) against add_lora_ref: a mixed batch where tokens use different adapters, or none."""
from __future__ import annotations

import pytest
import torch

from glmserve.kernels.reference.lora import add_lora_ref
from glmserve.kernels.triton.lora import add_lora


def _case(device, dtype, num_tokens, k, n, num_slots, rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, k, generator=gen)
    out = torch.randn(num_tokens, n, generator=gen)
    lora_a = torch.randn(num_slots, rank, k, generator=gen) * 0.1
    lora_b = torch.randn(num_slots, n, rank, generator=gen) * 0.1
    # Every slot, and tokens with no adapter (-1), interleaved as requests of a mixed batch are.
    slots = torch.randint(-1, num_slots, (num_tokens,), generator=gen)
    slots[0], slots[1] = -1, num_slots - 1
    to = dict(device=device, dtype=dtype)
    return out.to(**to), x.to(**to), lora_a.to(**to), lora_b.to(**to), slots.to(device)


@pytest.mark.parametrize("num_tokens, k, n, num_slots, rank, dtype", [
    (9, 64, 96, 3, 8, torch.float32),        # features not multiples of the tiles
    (5, 48, 200, 2, 4, torch.float32),       # N past one 128 tile, K under one tile
    (12, 130, 40, 4, 16, torch.float16),     # K past one tile
    (3, 32, 32, 1, 3, torch.float32),        # a rank that is not a power of two
    pytest.param(16, 256, 320, 4, 16, torch.bfloat16, marks=pytest.mark.gpu),
])
def test_add_lora_matches_reference(device, check_close, num_tokens, k, n, num_slots, rank, dtype):
    out, x, lora_a, lora_b, slots = _case(device, dtype, num_tokens, k, n, num_slots, rank)
    expected = out.clone()
    add_lora_ref(expected, x, lora_a, lora_b, slots)
    add_lora(out, x, lora_a, lora_b, slots)
    check_close(out, expected)


def test_tokens_without_adapter_are_untouched(device):
    out, x, lora_a, lora_b, _ = _case(device, torch.float32, 6, 32, 48, 2, 4)
    before = out.clone()
    slots = torch.tensor([-1, 0, -1, 1, -1, -1], device=device)
    add_lora(out, x, lora_a, lora_b, slots)
    untouched = slots < 0
    assert torch.equal(out[untouched], before[untouched])
    assert not torch.equal(out[~untouched], before[~untouched])


def test_zero_padded_rank_gives_the_small_adapters_product(device, check_close):
    """A rank-2 adapter stored in rank-8 slots (zero-padded) computes exactly B2 @ A2 @ x."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 40, generator=gen)
    a2, b2 = torch.randn(2, 40, generator=gen), torch.randn(24, 2, generator=gen)
    lora_a, lora_b = torch.zeros(1, 8, 40), torch.zeros(1, 24, 8)
    lora_a[0, :2], lora_b[0, :, :2] = a2, b2
    out = torch.zeros(4, 24, device=device)
    add_lora(out, x.to(device), lora_a.to(device), lora_b.to(device), torch.zeros(4, dtype=torch.int64, device=device))
    check_close(out, (x @ a2.t() @ b2.t()).to(device))


def test_empty_batch(device):
    out = torch.zeros(0, 8, device=device)
    add_lora(out, torch.zeros(0, 4, device=device), torch.zeros(1, 2, 4, device=device),
             torch.zeros(1, 8, 2, device=device), torch.zeros(0, dtype=torch.int64, device=device))


def test_b_as_a_transposed_view(device, check_close):
    """The engine keeps B as a transposed view of [S, R, N] storage; the kernel reads it through its strides."""
    out, x, lora_a, lora_b, slots = _case(device, torch.float32, 7, 40, 72, 3, 8)
    lora_b_view = lora_b.transpose(1, 2).contiguous().transpose(1, 2)
    assert not lora_b_view.is_contiguous()
    expected = out.clone()
    add_lora_ref(expected, x, lora_a, lora_b, slots)
    add_lora(out, x, lora_a, lora_b_view, slots)
    check_close(out, expected)
