"""engine/cpu_linear.py: the oneDNN fp32 linears agree with F.linear, repack after a weight change, and fall back
where they must (autograd, other dtypes)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmserve.engine import cpu_linear
from glmserve.engine.cpu_linear import Linear, PackedLinear

needs_onednn = pytest.mark.skipif(not cpu_linear.onednn_linear_supported(),
                                  reason="this torch build has no working oneDNN linear; F.linear is used")


def _float64_reference(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), layer.weight.double(), bias)


@pytest.mark.parametrize("cls", [Linear, PackedLinear])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_matches_float64_reference(cls, bias, rows):
    torch.manual_seed(rows)
    layer = cls(96, 200, bias=bias)
    x = torch.randn(rows, 96)
    with torch.inference_mode():
        out = layer(x)
    assert out.shape == (rows, 200) and out.dtype == torch.float32
    # fp32 accumulation over 96 terms: only the summation order differs from any other fp32 GEMM.
    torch.testing.assert_close(out.double(), _float64_reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.fixture
def onednn_calls(monkeypatch):
    calls = []
    real = cpu_linear._onednn_linear
    monkeypatch.setattr(cpu_linear, "_onednn_linear", lambda *a: calls.append(1) or real(*a))
    return calls


@needs_onednn
def test_large_matmuls_run_onednn_small_ones_f_linear(onednn_calls):
    layer = Linear(512, 256)                        # 131072 multiply-adds per row
    with torch.inference_mode():
        layer(torch.randn(32, 512))                 # 4.2 M: oneDNN
        assert onednn_calls == [1]
        layer(torch.randn(31, 512))                 # 4.06 M < 2**22: F.linear, oneDNN's fixed cost would not pay
        assert onednn_calls == [1]


@pytest.fixture(autouse=True)
def every_size_on_onednn(monkeypatch, request):
    # The numerics tests use small shapes: lower the size threshold so that they exercise oneDNN.
    if "onednn_calls" not in request.fixturenames:
        monkeypatch.setattr(cpu_linear, "MIN_MULTIPLY_ADDS", 0)


@needs_onednn
def test_packed_copy_is_remade_when_the_weight_changes():
    layer = PackedLinear(32, 48, bias=False)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        first = layer(x)
        with torch.no_grad():
            layer.weight.mul_(2.0)                     # in place: a new weight version
        doubled = layer(x)
    layer.weight = torch.nn.Parameter(torch.randn(48, 32))       # a new tensor altogether
    new_weight = layer.weight.detach().clone()
    with torch.inference_mode():
        replaced = layer(x)
        layer.weight = torch.nn.Parameter(torch.randn(48, 32))   # an inference tensor: no version counter
        inference_weight = layer(x)
    torch.testing.assert_close(doubled, 2 * first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(replaced, x @ new_weight.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inference_weight, x @ layer.weight.detach().t(), rtol=1e-5, atol=1e-5)


def test_autograd_and_other_dtypes_use_f_linear():
    layer = Linear(8, 4)
    out = layer(torch.randn(2, 8))                   # grad mode, weight requires grad: must be differentiable
    out.sum().backward()
    assert layer.weight.grad is not None
    half = PackedLinear(8, 4).to(torch.bfloat16)
    with torch.inference_mode():
        y = half(torch.randn(2, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert getattr(half, "_packed", None) is None   # bf16 stays on F.linear, with no packed copy


def test_switch_off_by_environment(monkeypatch):
    monkeypatch.setenv(cpu_linear.ENV_SWITCH, "0")
    cpu_linear.onednn_linear_supported.cache_clear()
    try:
        assert cpu_linear.onednn_linear_supported() is False
        layer = PackedLinear(8, 4)
        with torch.inference_mode():
            layer(torch.randn(2, 8))
        assert getattr(layer, "_packed", None) is None
    finally:
        monkeypatch.delenv(cpu_linear.ENV_SWITCH)
        cpu_linear.onednn_linear_supported.cache_clear()
