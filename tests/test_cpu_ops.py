"""kernels/cpu/fused_ops.py: the fused native norm, rotary and SwiGLU (float32 and bfloat16) against their torch
references (kernels/reference/fused_ops.py), and the torch fallbacks where the native path does not apply
(autograd, other dtypes)."""
from __future__ import annotations

import pytest
import torch

from glmserve.kernels.cpu import fused_ops as cpu_ops
from glmserve.kernels.cpu import native
from glmserve.kernels.cpu.availability import checked_library, native_cpu_available
from glmserve.kernels.reference.fused_ops import rms_norm_ref, rotate_pairs_ref, silu_mul_ref

needs_native = pytest.mark.skipif(not native_cpu_available(),
                                  reason="the native CPU kernels did not build here (no C compiler?)")


@pytest.fixture
def native_calls(monkeypatch):
    """Counts calls into the native library (the process's, which the ops use without a ``lib``), to tell which
    path ran."""
    calls = []
    real = checked_library()

    class Counting:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)
    monkeypatch.setattr(native, "library", lambda: Counting())
    return calls


@needs_native
@pytest.mark.parametrize("rows", [1, 7, 300])         # 300 x 512 crosses the size where the C code goes parallel
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_reference(rows, with_residual, native_calls):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 512, generator=generator) * 3
    residual = torch.randn(rows, 512, generator=generator) if with_residual else None
    weight = torch.randn(512, generator=generator)
    expected_sum = x + residual if with_residual else x.clone()
    with torch.inference_mode():
        summed, normed = cpu_ops.add_rms_norm(x, residual, weight, 1e-5)
    assert native_calls == ["glmserve_rms_norm_f32"]
    assert torch.equal(summed, expected_sum)
    torch.testing.assert_close(normed, rms_norm_ref(expected_sum, weight, 1e-5), rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize("tokens", [1, 5, 200])
def test_rotary_in_place_equals_reference_exactly(tokens, native_calls):
    generator = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, 8 + 2 * 2, 64, generator=generator)       # [T, H + 2 KVH, D]
    cos, sin = torch.rand(tokens, 16, generator=generator), torch.rand(tokens, 16, generator=generator)
    original = qkv.clone()
    with torch.inference_mode():
        cpu_ops.rotate_pairs_(qkv[:, :10], cos, sin)                    # Q and K heads; V untouched
    assert native_calls == ["glmserve_rotary_f32"]
    # No fused multiply-adds in the C build: the same roundings as torch's separate multiplies and adds.
    assert torch.equal(qkv[:, :10, :32], rotate_pairs_ref(original[:, :10], cos, sin))
    assert torch.equal(qkv[:, :10, 32:], original[:, :10, 32:]) and torch.equal(qkv[:, 10:], original[:, 10:])


@needs_native
@pytest.mark.parametrize("ffn", [20, 1368])
def test_silu_mul_matches_reference_at_every_magnitude(ffn, native_calls):
    generator = torch.Generator().manual_seed(ffn)
    gate_up = torch.randn(9, 2 * ffn, generator=generator) * 5
    gate_up[0, :6] = torch.tensor([-1000.0, -90.0, -30.0, 0.0, 30.0, 1000.0])   # exp under- and overflow
    with torch.inference_mode():
        out = cpu_ops.silu_mul(gate_up)
    assert native_calls == ["glmserve_silu_mul_f32"]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, silu_mul_ref(gate_up), rtol=1e-5, atol=1e-6)


@needs_native
@pytest.mark.parametrize("with_residual", [False, True])
def test_bfloat16_add_rms_norm_rounds_where_torch_does(with_residual, native_calls):
    generator = torch.Generator().manual_seed(2)
    x = (torch.randn(300, 512, generator=generator) * 3).bfloat16()
    residual = torch.randn(300, 512, generator=generator).bfloat16() if with_residual else None
    weight = torch.randn(512, generator=generator).bfloat16()
    expected_sum = x + residual if with_residual else x.clone()      # torch's bf16 add: one rounding
    with torch.inference_mode():
        summed, normed = cpu_ops.add_rms_norm(x, residual, weight, 1e-5)
    assert native_calls == ["glmserve_rms_norm_bf16"]
    assert torch.equal(summed, expected_sum)
    # The statistics differ from torch's only in float32 summation order: at most one bf16 step at the output.
    torch.testing.assert_close(normed, rms_norm_ref(expected_sum, weight, 1e-5), rtol=2 ** -7, atol=1e-6)


@needs_native
def test_bfloat16_rotary_in_place_equals_reference_exactly(native_calls):
    generator = torch.Generator().manual_seed(5)
    qkv = torch.randn(33, 8 + 2 * 2, 64, generator=generator).bfloat16()
    cos, sin = torch.rand(33, 16, generator=generator), torch.rand(33, 16, generator=generator)   # float32 tables
    original = qkv.clone()
    with torch.inference_mode():
        cpu_ops.rotate_pairs_(qkv[:, :10], cos, sin)
    assert native_calls == ["glmserve_rotary_bf16"]
    assert torch.equal(qkv[:, :10, :32], rotate_pairs_ref(original[:, :10], cos, sin))
    assert torch.equal(qkv[:, :10, 32:], original[:, :10, 32:]) and torch.equal(qkv[:, 10:], original[:, 10:])


@needs_native
@pytest.mark.parametrize("ffn", [20, 1368])
def test_bfloat16_silu_mul_rounds_where_torch_does(ffn, native_calls):
    generator = torch.Generator().manual_seed(ffn)
    gate_up = torch.randn(9, 2 * ffn, generator=generator) * 5
    gate_up[0, :6] = torch.tensor([-1000.0, -90.0, -30.0, 0.0, 30.0, 1000.0])
    gate_up = gate_up.bfloat16()
    with torch.inference_mode():
        out = cpu_ops.silu_mul(gate_up)
    assert native_calls == ["glmserve_silu_mul_bf16"]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # silu rounded to bf16, then the product rounded: torch's two bf16 ops; exp's last float32 bit may move a
    # rounding by one bf16 step.
    torch.testing.assert_close(out, silu_mul_ref(gate_up), rtol=2 ** -7, atol=1e-6)


def test_autograd_and_float16_take_the_torch_path(native_calls):
    x = torch.randn(3, 16, requires_grad=True)
    weight = torch.ones(16)
    summed, normed = cpu_ops.add_rms_norm(x, torch.ones(3, 16), weight, 1e-5)
    normed.sum().backward()                 # differentiable: the torch reference ran
    assert x.grad is not None and torch.equal(summed.detach(), x.detach() + 1)
    with torch.inference_mode():
        half = torch.randn(3, 2 * 8, dtype=torch.float16)
        assert cpu_ops.silu_mul(half).dtype == torch.float16
        heads = torch.randn(2, 3, 8, dtype=torch.float16)
        cpu_ops.rotate_pairs_(heads, torch.rand(2, 2), torch.rand(2, 2))
        mixed = torch.randn(3, 16, dtype=torch.bfloat16)          # a bf16 activation with a float32 weight
        cpu_ops.add_rms_norm(mixed, None, torch.ones(16), 1e-5)
    assert native_calls == []
