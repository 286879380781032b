"""A GLM layer's elementwise steps (RMSNorm with the residual add, rotary, SwiGLU) in one fused native call each,
for float32 and bfloat16 on the CPU (``kernels/cpu/csrc/fused_ops.c``).

At decode batch sizes these steps are a few dozen small torch ops per layer, each paying dispatch and OpenMP
start-up; the fused calls do one pass over the data instead. The torch references (``kernels/reference/fused_ops.py``)
are what they are tested against: the native ones agree with them to float32 rounding (the rotary exactly); in
bfloat16 they round where torch's bf16 ops round, so they agree to within one bf16 step.

Whether the native library is used at all is decided once, when a backend is chosen (the ``cpu`` backend binds
these; ``torch`` binds the references). Here only the operands decide: the references run for what the C code has
no instance for (float16, other devices, non-contiguous rows) and under autograd. Every function takes the loaded
library as ``lib``; without it they use the process's ``native.library()``.
"""
from __future__ import annotations

import ctypes

import torch

from glmserve.kernels.cpu import native
from glmserve.kernels.reference.fused_ops import (add_rms_norm_ref, rms_norm_ref, rotate_pairs_ref,
                                                  rotate_pairs_ref_, silu_mul_ref)

# Activation dtype -> suffix of the C functions for it.
_SUFFIXES = {torch.float32: "f32", torch.bfloat16: "bf16"}


def _native(*tensors: torch.Tensor) -> str | None:
    """The suffix of the native functions for these operands (all on the CPU, of one dtype the library has, no
    autograd), or None: use torch."""
    dtype = tensors[0].dtype
    if (dtype in _SUFFIXES and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
            and not torch.is_grad_enabled()):
        return _SUFFIXES[dtype]
    return None


def _process_library() -> ctypes.CDLL:
    """The process's library, for calls without a ``lib``."""
    lib = native.library()
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available")
    return lib


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 lib: ctypes.CDLL | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rms_norm(x + residual)); x: [T, dim]. The native path adds into ``x`` in place, so x must be
    the caller's own activation (never a parameter or a view someone else reads)."""
    suffix = _native(x, weight) if residual is None else _native(x, weight, residual)
    if suffix is None or x.dim() != 2 or not x.is_contiguous():
        return add_rms_norm_ref(x, residual, weight, eps)
    rows, dim = x.shape
    out = torch.empty_like(x)
    if residual is not None:
        residual = residual.contiguous()
    getattr(lib if lib is not None else _process_library(), f"glmserve_rms_norm_{suffix}")(
        x.data_ptr(), dim, None if residual is None else residual.data_ptr(), weight.contiguous().data_ptr(),
        out.data_ptr(), rows, dim, eps, torch.get_num_threads())
    return x, out


def rotate_pairs_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, lib: ctypes.CDLL | None = None) -> None:
    """In place: rotary on the first 2 * cos.shape[-1] features of each head of x [T, heads, D] (a view; the
    feature dimension contiguous); cos, sin [T, rot/2] float32."""
    suffix = _native(x)
    if (suffix is not None and _native(cos, sin) == "f32" and x.stride(-1) == 1 and cos.is_contiguous()
            and sin.is_contiguous()):
        tokens, heads, _ = x.shape
        getattr(lib if lib is not None else _process_library(), f"glmserve_rotary_{suffix}")(
            x.data_ptr(), tokens, heads, x.stride(0), x.stride(1), 2 * cos.shape[-1], cos.data_ptr(), sin.data_ptr(),
            torch.get_num_threads())
        return
    rotate_pairs_ref_(x, cos, sin)


def silu_mul(gate_up: torch.Tensor, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """SwiGLU: silu(first half) * second half of gate_up [T, 2F] -> [T, F]."""
    suffix = _native(gate_up)
    if suffix is None or not gate_up.is_contiguous():
        return silu_mul_ref(gate_up)
    rows, width = gate_up.shape
    out = gate_up.new_empty(rows, width // 2)
    getattr(lib if lib is not None else _process_library(), f"glmserve_silu_mul_{suffix}")(
        gate_up.data_ptr(), out.data_ptr(), rows, width // 2, torch.get_num_threads())
    return out


def self_check(lib: ctypes.CDLL) -> bool:
    """Each op of ``lib`` against its torch reference on a small case, float32 and bfloat16 (called by
    ``availability.native_cpu_available``)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 40, generator=generator)
    residual = torch.randn(5, 40, generator=generator)
    weight = torch.randn(40, generator=generator)
    summed, normed = x.clone(), torch.empty(5, 40)
    lib.glmserve_rms_norm_f32(summed.data_ptr(), 40, residual.data_ptr(), weight.data_ptr(), normed.data_ptr(),
                              5, 40, 1e-5, 1)
    ok = torch.equal(summed, x + residual)
    ok = ok and torch.allclose(normed, rms_norm_ref(x + residual, weight, 1e-5), rtol=1e-5, atol=1e-5)

    heads = torch.randn(3, 4, 24, generator=generator)
    cos, sin = torch.randn(3, 6, generator=generator), torch.randn(3, 6, generator=generator)
    rotated = heads.clone()
    lib.glmserve_rotary_f32(rotated.data_ptr(), 3, 4, 96, 24, 12, cos.data_ptr(), sin.data_ptr(), 1)
    ok = ok and torch.equal(rotated[..., :12], rotate_pairs_ref(heads, cos, sin))
    ok = ok and torch.equal(rotated[..., 12:], heads[..., 12:])

    gate_up = torch.randn(3, 2 * 20, generator=generator) * 8
    out = torch.empty(3, 20)
    lib.glmserve_silu_mul_f32(gate_up.data_ptr(), out.data_ptr(), 3, 20, 1)
    ok = ok and torch.allclose(out, silu_mul_ref(gate_up), rtol=1e-5, atol=1e-6)
    return bool(ok and _bfloat16_ok(lib, x, residual, weight, heads, cos, sin, gate_up))


def _bfloat16_ok(lib, x, residual, weight, heads, cos, sin, gate_up) -> bool:
    """The bf16 instances on the same cases: exact where torch rounds once, within one bf16 step elsewhere."""
    x, residual, weight, heads, gate_up = (t.bfloat16() for t in (x, residual, weight, heads, gate_up))
    summed, normed = x.clone(), torch.empty(5, 40, dtype=torch.bfloat16)
    lib.glmserve_rms_norm_bf16(summed.data_ptr(), 40, residual.data_ptr(), weight.data_ptr(), normed.data_ptr(),
                               5, 40, 1e-5, 1)
    ok = torch.equal(summed, x + residual)
    ok = ok and torch.allclose(normed.float(), rms_norm_ref(x + residual, weight, 1e-5).float(), rtol=2 ** -7,
                               atol=1e-6)
    rotated = heads.clone()
    lib.glmserve_rotary_bf16(rotated.data_ptr(), 3, 4, 96, 24, 12, cos.data_ptr(), sin.data_ptr(), 1)
    ok = ok and torch.equal(rotated[..., :12], rotate_pairs_ref(heads, cos, sin))
    out = torch.empty(3, 20, dtype=torch.bfloat16)
    lib.glmserve_silu_mul_bf16(gate_up.data_ptr(), out.data_ptr(), 3, 20, 1)
    return bool(ok and torch.allclose(out.float(), silu_mul_ref(gate_up).float(), rtol=2 ** -7, atol=1e-6))
