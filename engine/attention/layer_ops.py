"""The elementwise steps of a GLM layer (RMSNorm with the residual add, rotary, SwiGLU), as the backend the model
is bound to runs them: ``LayerOps`` are the pure-torch references (the ``torch`` and ``triton`` backends),
``NativeCpuLayerOps`` the native fused calls (the ``cpu`` backend)."""
from __future__ import annotations

import ctypes
import functools

import torch

from glmserve.kernels.cpu.fused_ops import add_rms_norm, rotate_pairs_, silu_mul
from glmserve.kernels.reference.fused_ops import add_rms_norm_ref, rotate_pairs_ref_, silu_mul_ref


class LayerOps:
    """Pure torch (``kernels/reference/fused_ops.py``): runs anywhere, differentiable; the reference mode."""

    name = "torch"

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, rms_norm(x + residual)); ``residual`` None: (x, rms_norm(x)). x [T, dim] may be updated
        in place, so it must be the caller's own activation."""
        return add_rms_norm_ref(x, residual, weight, eps)

    def rotate_pairs_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """In place: rotary on the first 2 * cos.shape[-1] features of each head of x [T, heads, D] (a view,
        features contiguous); cos, sin [T, rot/2] float32."""
        rotate_pairs_ref_(x, cos, sin)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SwiGLU: silu(first half) * second half of gate_up [T, 2F] -> [T, F]."""
        return silu_mul_ref(gate_up)


TORCH_LAYER_OPS = LayerOps()


class NativeCpuLayerOps(LayerOps):
    """One fused native call per step (``kernels/cpu/fused_ops.py``) through the checked library ``lib``; the
    kernels themselves fall back to the references for operands the C code has no instance for (float16, autograd)."""

    name = "cpu"

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        # Bound as instance attributes rather than methods: one Python frame less per call on the decode path.
        self.add_rms_norm = functools.partial(add_rms_norm, lib=lib)
        self.rotate_pairs_ = functools.partial(rotate_pairs_, lib=lib)
        self.silu_mul = functools.partial(silu_mul, lib=lib)
