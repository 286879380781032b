"""Split-KV (kernels/triton/split_kv.py): the split choice fills an H100, splits partition the keys, and splits
that hold no key are neither written nor read (the CUDA-graph path fixes the split count for the longest context,
so most of its splits are empty at short contexts)."""
from __future__ import annotations

import math

import pytest
import torch

from glmserve.kernels.reference.attention import paged_decode_attention_ref, paged_extend_attention_ref
from glmserve.kernels.triton.decode_attention import paged_decode_attention
from glmserve.kernels.triton.extend_attention import paged_extend_attention
from glmserve.kernels.triton.split_kv import (BLOCK_N, MAX_SPLITS, MIN_TOKENS_PER_SPLIT, active_splits,
                                              choose_num_splits, merge_splits, split_bounds)

H100_SMS = 132


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, 64, 256])
def test_splits_partition_the_keys_in_runs_of_at_least_128(num_splits):
    for num_keys in list(range(0, 700)) + [4095, 4096, 8192, 32768]:
        runs = [split_bounds(num_keys, s, num_splits) for s in range(num_splits)]
        held = [(a, b) for a, b in runs if a < b]
        assert len(held) == active_splits(num_keys, num_splits) <= num_splits
        assert runs[:len(held)] == held                       # the splits holding keys come first
        assert [a for a, _ in held] == [0] * bool(held) + [b for _, b in held[:-1]]  # back to back from key 0
        assert held[-1][1] == num_keys if held else num_keys == 0
        assert all(b - a >= MIN_TOKENS_PER_SPLIT for a, b in held[:-1])
        assert all(a % BLOCK_N == 0 for a, _ in held)


def test_split_choice_gives_about_four_programs_per_sm_when_the_context_allows():
    kv_heads = 2
    for batch in (1, 2, 3, 8, 16, 33, 64, 128, 256):
        for context in (1, 64, 128, 129, 1000, 1024, 4096, 8192, 16384, 32768, 65536):
            splits = choose_num_splits(batch, kv_heads, context, sms=H100_SMS)
            programs = batch * kv_heads * splits
            assert splits <= max(1, math.ceil(context / MIN_TOKENS_PER_SPLIT))    # >= 128 tokens a split
            wanted = math.ceil(4 * H100_SMS / (batch * kv_heads))
            if wanted * MIN_TOKENS_PER_SPLIT <= context:
                # 4 programs per SM, but for the cap of 256 splits at batch 1 (512 programs, 3.9 per SM)
                assert programs >= min(4 * H100_SMS, batch * kv_heads * MAX_SPLITS) >= 3.8 * H100_SMS, \
                    (batch, context, splits)
    # The review's case: batch 1 at 1K context had 4 splits (8 programs); now every 128 tokens get a split.
    assert choose_num_splits(1, 2, 1024, sms=H100_SMS) == 8
    # A CUDA-graph step sizes splits for the 32K model, but a 1K sequence still fills only 8 of them.
    assert choose_num_splits(1, 2, 32768, sms=H100_SMS) == MAX_SPLITS
    assert active_splits(1024, MAX_SPLITS) == 8


def _merge_ref(part_out, part_lse):
    """Weighted sum over the splits whose lse is finite (log2 units); zeros where none is."""
    held = torch.isfinite(part_lse)
    lse = torch.where(held, part_lse, torch.full_like(part_lse, -1e30))
    weights = torch.softmax(lse * math.log(2), dim=-1) * held
    parts = torch.where(held[..., None], part_out, torch.zeros_like(part_out))
    return (parts * weights[..., None]).sum(-2)


def test_merge_never_reads_the_output_of_a_split_without_keys(device):
    # Per row and head the splits holding keys come first (as the kernels write them); 70 splits are three merge
    # steps of 32. Held counts: none, one step exactly, one more than a step, all of them, and random ones.
    rows, heads, splits, dim = 3, 4, 70, 32
    gen = torch.Generator().manual_seed(0)
    part_out = torch.randn(rows, heads, splits, dim, generator=gen)
    part_lse = torch.randn(rows, heads, splits, generator=gen) * 4
    held = torch.randint(1, splits + 1, (rows, heads), generator=gen)
    held[0, :] = torch.tensor([0, 32, 33, splits])
    for r in range(rows):
        for h in range(heads):
            part_lse[r, h, held[r, h]:] = float("-inf")
            part_out[r, h, held[r, h]:] = float("nan")   # unwritten memory: must not reach the output
    out = torch.full((rows, heads, dim), float("nan"), device=device)
    merge_splits(part_out.to(device), part_lse.to(device), out)
    expected = _merge_ref(part_out, part_lse)
    assert torch.isfinite(out).all()
    assert not out[0, 0].any()
    torch.testing.assert_close(out.cpu(), expected, atol=2e-5, rtol=1e-5)


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors (what uninitialised memory may hold); yields those made."""
    made = []
    real_empty = torch.empty

    def empty(*args, **kwargs):
        tensor = real_empty(*args, **kwargs)
        if tensor.is_floating_point():
            tensor.fill_(float("nan"))
            made.append(tensor)
        return tensor
    monkeypatch.setattr(torch, "empty", empty)
    return made


def test_decode_with_a_graph_sized_split_count_writes_only_splits_holding_keys(paged_kv, check_close, device,
                                                                                poisoned_empty):
    # A CUDA-graph step's split count comes from the longest possible context: 32 splits here, for sequences
    # that fill between 1 and 3 of them.
    seq_lens, heads, kv_heads, dim, splits = [1, 130, 300], 8, 2, 32, 32
    kv = paged_kv(seq_lens, kv_heads, dim, 16, torch.float32, seed=11)
    query = torch.randn(len(seq_lens), heads, dim, device=device)
    expected = paged_decode_attention_ref(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.17)
    actual = paged_decode_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, kv.seq_lens, 0.17,
                                    num_splits=splits)
    check_close(actual, expected)
    part_out = next(t for t in poisoned_empty if t.shape == (len(seq_lens), heads, splits, dim))
    for b, length in enumerate(seq_lens):
        held = active_splits(length, splits)
        assert torch.isfinite(part_out[b, :, :held]).all()
        assert torch.isnan(part_out[b, :, held:]).all(), f"sequence {b}: a split without keys wrote its output"


def test_extend_padding_rows_merge_to_zeros_not_nan(paged_kv, check_close, device, poisoned_empty):
    # Split-KV extend over cached prefixes with two padding tokens after the last chunk (the runner's layout):
    # their rows are written by no program and must merge to zeros, not to NaN from unwritten partials.
    seq_lens, query_lens, heads, kv_heads, dim = [300, 40], [3, 5], 4, 2, 32
    kv = paged_kv(seq_lens, kv_heads, dim, 16, torch.float32, seed=12)
    starts = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    query = torch.randn(10, heads, dim, device=device)
    actual = paged_extend_attention(query, kv.k_cache, kv.v_cache, kv.block_tables, starts, kv.seq_lens, 0.2,
                                    max(query_lens), num_splits=4)
    expected = paged_extend_attention_ref(query[:8], kv.k_cache, kv.v_cache, kv.block_tables, starts,
                                          kv.seq_lens, 0.2)
    check_close(actual[:8], expected)
    assert torch.equal(actual[8:], torch.zeros_like(actual[8:]))
