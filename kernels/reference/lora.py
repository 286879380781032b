"""Pure-torch reference of the batched LoRA update (the S-LoRA / punica "gather matmul"): the function the Triton
kernel (``kernels/triton/lora.py``) is tested against.

Many adapters serve one batch: token t uses the adapter in slot ``token_slots[t]`` (-1: none) of stacked weights.

    out[t] += lora_b[s] @ (lora_a[s] @ x[t])        for s = token_slots[t] >= 0

lora_a: [S, R, K] (the adapters' ``lora_A`` zero-padded to the slots' rank R), lora_b: [S, N, R] (``lora_B`` with the
adapter's scaling already folded in). Zero padding of the rank adds exact zeros, so a smaller adapter computes exactly
its own product. Computed in float32, added to ``out`` in its dtype.
"""
from __future__ import annotations

import torch


def add_lora_ref(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                 token_slots: torch.Tensor) -> None:
    """out [T, N] (in place) += the LoRA update of x [T, K] per token; token_slots [T] int (-1 = no adapter)."""
    for slot in torch.unique(token_slots).tolist():
        if slot < 0:
            continue
        rows = (token_slots == slot).nonzero().flatten()
        shrunk = x[rows].float() @ lora_a[slot].float().t()                 # [n, R]
        out[rows] += (shrunk @ lora_b[slot].float().t()).to(out.dtype)     # [n, N]
