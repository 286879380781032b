"""Triton kernels: the batched LoRA update of a mixed batch, one adapter per token (punica's BGMV idea).

Same function as ``reference.add_lora_ref``: ``out[t] += lora_b[s] @ (lora_a[s] @ x[t])`` for the slot
``s = token_slots[t]``, skipping tokens with slot -1. Two launches:

- shrink: ``h[t, :] = lora_a[s] @ x[t]``, [T, R] in float32, one program per token (R is small: the max rank);
- expand: ``out[t, n-tile] += lora_b[s][n-tile] @ h[t]``, one program per (token, tile of output features).

Each program reads its own token's adapter, so requests of different adapters (and of none) share one launch.
Accumulation is in float32 whatever the storage dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, slots_ptr, h_ptr,
    stride_xt, stride_as, stride_ar, stride_ht,          # x [T, K]; a [S, R, K]; h [T, R] (last dims contiguous)
    K: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot < 0:
        return
    ranks = tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    token64 = token.to(tl.int64)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        x = tl.load(x_ptr + token64 * stride_xt + k, mask=k < K, other=0.0).to(tl.float32)
        a_mask = (ranks[:, None] < R) & (k[None, :] < K)
        a = tl.load(a_ptr + slot * stride_as + ranks[:, None] * stride_ar + k[None, :], mask=a_mask,
                    other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    tl.store(h_ptr + token64 * stride_ht + ranks, acc, mask=ranks < R)


@triton.jit
def _lora_expand_kernel(
    h_ptr, b_ptr, slots_ptr, out_ptr,
    stride_ht, stride_bs, stride_bn, stride_br, stride_ot,    # h [T, R]; b [S, N, R] (any strides); out [T, N]
    N: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot < 0:
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    token64 = token.to(tl.int64)
    h = tl.load(h_ptr + token64 * stride_ht + ranks, mask=ranks < R, other=0.0)
    b_mask = (n[:, None] < N) & (ranks[None, :] < R)
    b = tl.load(b_ptr + slot * stride_bs + n[:, None] * stride_bn + ranks[None, :] * stride_br, mask=b_mask,
                other=0.0).to(tl.float32)
    update = tl.sum(b * h[None, :], axis=1)                                     # [BLOCK_N]
    out_offs = out_ptr + token64 * stride_ot + n
    current = tl.load(out_offs, mask=n < N, other=0.0).to(tl.float32)
    tl.store(out_offs, (current + update).to(out_ptr.dtype.element_ty), mask=n < N)


def add_lora(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             token_slots: torch.Tensor, block_n: int = 128, block_k: int = 128) -> None:
    """out [T, N] (in place) += per-token LoRA update of x [T, K]; lora_a [S, R, K], lora_b [S, N, R];
    token_slots [T] int (-1 = no adapter). ``out``, ``x`` and ``lora_a`` need a contiguous last dimension; ``lora_b``
    may be any strided view (the engine keeps it as a transposed [S, R, N] buffer)."""
    num_tokens, k = x.shape
    if num_tokens == 0:
        return
    _, rank, _ = lora_a.shape
    n = lora_b.shape[1]
    assert out.shape == (num_tokens, n) and lora_a.shape[2] == k and lora_b.shape[2] == rank
    assert x.stride(-1) == 1 and out.stride(-1) == 1, "x and out need a contiguous last dimension"
    if lora_a.stride(-1) != 1:
        lora_a = lora_a.contiguous()
    shrunk = torch.zeros(num_tokens, rank, dtype=torch.float32, device=x.device)
    block_r = triton.next_power_of_2(rank)
    block_k = min(block_k, triton.next_power_of_2(k))
    block_n = min(block_n, triton.next_power_of_2(n))
    _lora_shrink_kernel[(num_tokens,)](
        x, lora_a, token_slots, shrunk, x.stride(0), lora_a.stride(0), lora_a.stride(1), shrunk.stride(0),
        K=k, R=rank, BLOCK_R=block_r, BLOCK_K=block_k)
    _lora_expand_kernel[(num_tokens, triton.cdiv(n, block_n))](
        shrunk, lora_b, token_slots, out, shrunk.stride(0), lora_b.stride(0), lora_b.stride(1), lora_b.stride(2),
        out.stride(0),
        N=n, R=rank, BLOCK_R=block_r, BLOCK_N=block_n)
