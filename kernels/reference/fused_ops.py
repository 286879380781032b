"""Pure-torch references of a GLM layer's elementwise steps: RMSNorm with the residual add before it, rotary, SwiGLU.

What the native fused ops (``kernels/cpu/fused_ops.py``) are tested against, and what the model runs on the
``torch`` and ``triton`` backends.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ChatGLM's RMSNorm: statistics and weight in float32, one cast back at the end."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x32).to(x.dtype)


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rms_norm(x + residual)); ``residual`` None: (x, rms_norm(x)). x: [T, dim]; never in place."""
    if residual is not None:
        x = x + residual
    return x, rms_norm_ref(x, weight, eps)


def rotate_pairs_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, >= rot] with cos, sin [T, rot/2]: the rotated first ``rot`` features (GPT-J pairs), x's dtype."""
    rot = 2 * cos.shape[-1]
    pairs = x[..., :rot].float().unflatten(-1, (rot // 2, 2))             # [T, heads, rot/2, 2]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2).to(x.dtype)


def rotate_pairs_ref_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place: ``rotate_pairs_ref`` written back into the first 2 * cos.shape[-1] features of each head of x."""
    x[..., :2 * cos.shape[-1]] = rotate_pairs_ref(x, cos, sin)


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(first half) * second half of gate_up [T, 2F] -> [T, F]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
