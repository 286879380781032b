"""engine/model/cpu_linear.py: the oneDNN fp32 linears agree with a float64 reference, plain and packed; packed
bf16 weights give F.linear's bf16 results; packing drops the plain weight and unpacking restores it exactly; they
fall back where they must (autograd, other dtypes); a Linear is plain F.linear until bound to oneDNN."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from glmserve.engine.model import cpu_linear
from glmserve.engine.model.cpu_linear import Linear, bind_linears, pack_linears

needs_onednn = pytest.mark.skipif(not cpu_linear.onednn_linear_supported(),
                                  reason="this torch build has no working oneDNN linear; F.linear is used")


def _float64_reference(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if layer.bias is None else layer.bias.double()
    return F.linear(x.double(), layer.weight.double(), bias)


@pytest.mark.parametrize("mode", ["F.linear", "oneDNN", "packed"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_matches_float64_reference(mode, bias, rows):
    torch.manual_seed(rows)
    layer = Linear(96, 200, bias=bias)
    x = torch.randn(rows, 96)
    expected = _float64_reference(layer, x)
    layer.use_onednn = mode == "oneDNN" and cpu_linear.onednn_linear_supported()
    if mode == "packed":
        assert layer.pack() is (cpu_linear.onednn_linear_supported())
    with torch.inference_mode():
        out = layer(x)
    assert out.shape == (rows, 200) and out.dtype == torch.float32
    # fp32 accumulation over 96 terms: only the summation order differs from any other fp32 GEMM.
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


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
        layer(torch.randn(64, 512))                 # not bound to oneDNN: F.linear at any size
        assert onednn_calls == []
        layer.use_onednn = True
        layer(torch.randn(32, 512))                 # 4.2 M: oneDNN
        assert onednn_calls == [1]
        layer(torch.randn(31, 512))                 # 4.06 M < 2**22: F.linear, oneDNN's fixed cost would not pay
        assert onednn_calls == [1]


@pytest.fixture(autouse=True)
def every_size_on_onednn(monkeypatch, request):
    # The numerics tests use small shapes: lower the size thresholds so that they exercise oneDNN and packing.
    if "onednn_calls" not in request.fixturenames:
        monkeypatch.setattr(cpu_linear, "MIN_MULTIPLY_ADDS", 0)
        monkeypatch.setattr(cpu_linear, "PACK_MIN_WEIGHT_ELEMENTS", 0)


@needs_onednn
def test_packing_drops_the_plain_weight_and_unpacking_restores_it_exactly():
    layer = Linear(32, 48, bias=True)
    weight = layer.weight.detach().clone()
    assert layer.pack() is True and layer.pack() is True          # packing twice is a no-op
    assert "weight" not in dict(layer.named_parameters())          # the plain copy is gone, not kept beside
    with pytest.raises(AttributeError, match="packed for oneDNN"):
        layer.weight
    assert torch.equal(layer.state_dict()["weight"], weight)      # checkpoint names and layout, packed or not
    new_weight = torch.randn(48, 32)
    layer.load_state_dict({"weight": new_weight, "bias": layer.bias.detach()})
    assert layer._packed is not None and torch.equal(layer.state_dict()["weight"], new_weight)
    layer.unpack()
    assert torch.equal(layer.weight, new_weight)


@needs_onednn
def test_pack_linears_packs_large_float32_and_bfloat16_layers_only(monkeypatch):
    monkeypatch.setattr(cpu_linear, "PACK_MIN_WEIGHT_ELEMENTS", 1000)
    model = torch.nn.Sequential(Linear(40, 30), Linear(30, 20), Linear(40, 30).to(torch.bfloat16),
                                Linear(40, 30).to(torch.float16), torch.nn.Linear(40, 30))
    bf16 = cpu_linear.onednn_bf16_packing_supported()
    # 1200 elements; 600 is too small; bf16 where oneDNN has bf16 kernels; fp16 never; not our Linear
    assert pack_linears(model) == 1 + bf16
    assert model[0]._packed is not None and model[1]._packed is None and (model[2]._packed is not None) == bf16
    assert model[3]._packed is None
    with pytest.raises(TypeError, match="takes torch.float32 CPU inputs, got torch.bfloat16"):
        model[0](torch.randn(2, 40, dtype=torch.bfloat16))


@pytest.mark.skipif(not cpu_linear.onednn_bf16_packing_supported(), reason="oneDNN has no bf16 kernels here")
@pytest.mark.parametrize("rows", [1, 64])
def test_packed_bfloat16_gives_f_linears_result(rows):
    torch.manual_seed(rows)
    layer = Linear(96, 200).to(torch.bfloat16)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    reference = _float64_reference(layer, x)
    with torch.inference_mode():
        expected = F.linear(x, layer.weight, layer.bias)
        assert layer.pack() is True
        out = layer(x)
    assert out.dtype == torch.bfloat16
    # F.linear's bf16 matmul is oneDNN's too; the blocked layout may only change the summation order.
    torch.testing.assert_close(out, expected, rtol=2 ** -7, atol=1e-2)
    torch.testing.assert_close(out.double(), reference, rtol=2 ** -6, atol=5e-2)


def test_autograd_and_other_dtypes_use_f_linear():
    layer = Linear(8, 4)
    out = layer(torch.randn(2, 8))                   # grad mode, weight requires grad: must be differentiable
    out.sum().backward()
    assert layer.weight.grad is not None
    half = Linear(8, 4).to(torch.float16)
    assert half.pack() is False                       # fp16 stays on F.linear, unpacked
    with torch.inference_mode():
        y = half(torch.randn(2, 8, dtype=torch.float16))
    assert y.dtype == torch.float16


def test_switch_off_by_environment(monkeypatch):
    monkeypatch.setenv(cpu_linear.ENV_SWITCH, "0")
    assert cpu_linear.onednn_linear_supported() is False
    layer = Linear(8, 4)
    assert layer.pack() is False and layer._packed is None
    assert bind_linears(torch.nn.Sequential(layer), onednn=True) == 0 and not layer.use_onednn


@needs_onednn
def test_bind_linears_packs_for_onednn_and_unpacks_for_plain_torch(monkeypatch):
    model = torch.nn.Sequential(Linear(40, 30), Linear(30, 20).to(torch.float16))
    weight = model[0].weight.detach().clone()
    assert bind_linears(model, onednn=True) == 1
    assert model[0]._packed is not None and model[0].use_onednn and model[1]._packed is None
    assert bind_linears(model, onednn=False) == 0            # bound again, to a plain-torch backend
    assert model[0]._packed is None and not model[0].use_onednn and torch.equal(model[0].weight, weight)
    # The switch is read when the layers are bound (no cache to clear): off now, on again after.
    monkeypatch.setenv(cpu_linear.ENV_SWITCH, "0")
    assert bind_linears(model, onednn=True) == 0 and not model[0].use_onednn
    monkeypatch.delenv(cpu_linear.ENV_SWITCH)
    assert bind_linears(model, onednn=True) == 1 and model[0].use_onednn
