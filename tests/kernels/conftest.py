"""Kernel tests run compiled on a CUDA device, and in the Triton interpreter on the CPU otherwise.

TRITON_INTERPRET must be set before triton is imported (``triton.jit`` reads it when a kernel is defined); the
kernel modules are imported by the test modules, which pytest imports after this file.
Helpers reach the tests as fixtures (``device``, ``paged_kv``, ``check_close``); cases marked ``gpu`` (bf16) skip
on the CPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (atol, rtol) of a kernel's output against the float32 reference rounded to the same dtype.
TOLERANCE = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
POISON = 30.0   # cache slots no sequence owns: a kernel that reads them gets a large error


@dataclass
class PagedKV:
    """A paged KV cache holding ``seq_lens`` tokens per sequence in shuffled, non-contiguous blocks."""

    k_cache: torch.Tensor        # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor   # [B, max_blocks] int32, unused entries -1
    seq_lens: torch.Tensor       # [B] int32
    slots: list                  # per sequence: [seq_len] int64 slot of each token


def make_paged_kv(seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                  seed: int = 0) -> PagedKV:
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [(n + block_size - 1) // block_size for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3                  # spare blocks nobody owns
    order = torch.randperm(num_blocks, generator=gen)     # shuffled block ids
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, POISON)
    v_cache = torch.full(shape, POISON)
    block_tables = torch.full((len(seq_lens), max(blocks_per_seq)), -1, dtype=torch.int32)
    slots, used = [], 0
    for b, (length, count) in enumerate(zip(seq_lens, blocks_per_seq)):
        ids = order[used:used + count]
        used += count
        block_tables[b, :count] = ids.int()
        pos = torch.arange(length)
        seq_slots = ids[pos // block_size] * block_size + pos % block_size
        k_cache.view(-1, num_kv_heads, head_dim)[seq_slots] = torch.randn(length, num_kv_heads, head_dim, generator=gen)
        v_cache.view(-1, num_kv_heads, head_dim)[seq_slots] = torch.randn(length, num_kv_heads, head_dim, generator=gen)
        slots.append(seq_slots)
    return PagedKV(k_cache.to(DEVICE, dtype), v_cache.to(DEVICE, dtype), block_tables.to(DEVICE),
                   torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), slots)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOLERANCE[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def pytest_runtest_setup(item):
    if item.get_closest_marker("gpu") is not None and DEVICE.type != "cuda":
        pytest.skip("needs a CUDA device")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture
def paged_kv():
    """make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, seed=0) -> PagedKV"""
    return make_paged_kv


@pytest.fixture
def check_close():
    """check_close(actual, expected): tolerance by the expected tensor's dtype."""
    return _assert_close


def pytest_collection_modifyitems(items):
    """Every test in this folder runs Triton kernels (in the interpreter on the CPU): left out of `make test-fast`."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.interpreter)
