"""Float32 linear layers on the CPU through oneDNN instead of torch's default BLAS.

Why: torch's CPU ``F.linear``/``matmul`` call MKL's sgemm, which on this project's AMD EPYC machines runs
1.2-1.5x (layer shapes) to 2-4x (the 65024-row output layer at decode batch sizes) slower than oneDNN's matmul on
the same fp32 operands (bench/RESULTS.md, "oneDNN linears"). oneDNN computes in fp32 with fp32 accumulation:
results differ from MKL's only by summation order (|diff| ~1e-6 relative), and greedy outputs still equal HF.

``torch.ops.mkldnn._linear_pointwise`` is the op torch's own CPU compiler emits for linears; it is an internal
op, so ``onednn_linear_supported`` probes it once (present, runs, and agrees with ``F.linear``) and everything
falls back to ``F.linear`` where it is missing. Set ``GLMSERVE_ONEDNN_LINEAR=0`` to turn it off.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

ENV_SWITCH = "GLMSERVE_ONEDNN_LINEAR"
# oneDNN costs ~13-15 us more per call than F.linear (`glmserve-bench cpu-linear` on small shapes), which only
# pays off once the matmul has about 4 M multiply-adds (rows x in x out): below that F.linear is as fast or faster.
MIN_MULTIPLY_ADDS = 1 << 22


@functools.lru_cache(maxsize=1)
def onednn_linear_supported() -> bool:
    """Whether this torch build runs oneDNN fp32 linears correctly (checked once per process)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(5, 24, generator=generator)
        weight = torch.randn(40, 24, generator=generator)
        bias = torch.randn(40, generator=generator)
        with torch.inference_mode():
            ok = torch.allclose(_onednn_linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-4, atol=1e-4)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 5)
            ok = ok and torch.allclose(_onednn_linear(x, packed, None), F.linear(x, weight), rtol=1e-4, atol=1e-4)
        return bool(ok)
    except Exception:   # noqa: BLE001 - any failure of an internal op means: use F.linear
        return False


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ weight [out, in]^T (+ bias) -> [..., out]; ``weight`` may be a prepacked oneDNN tensor."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # Inference only (the op has no backward), fp32 on the CPU only: other dtypes keep torch's numerics.
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() * weight.shape[0] >= MIN_MULTIPLY_ADDS        # rows x in x out
            and not (torch.is_grad_enabled() and weight.requires_grad) and onednn_linear_supported())


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and checkpoint names) whose CPU fp32 inference runs oneDNN's matmul on the
    weight as stored: no second copy of the weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_onednn(x, self.weight):
            return _onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class PackedLinear(nn.Linear):
    """A ``Linear`` for the vocabulary projection: on the CPU it multiplies by a copy of the weight reordered once
    into oneDNN's blocked layout (remade when the weight changes), a further ~1.2x at decode batch sizes on the
    largest matmul of a step. The copy costs the layer's size again, so only the output layer gets it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _use_onednn(x, self.weight):
            return F.linear(x, self.weight, self.bias)
        # Inference tensors have no version counter: for a weight made under inference_mode only replacing the
        # tensor (what the loader does) is noticed, not an in-place edit.
        version = None if self.weight.is_inference() else self.weight._version
        cached = getattr(self, "_packed", None)
        if cached is None or cached[0] is not self.weight or cached[1] != version:
            # The batch-size hint only tunes the layout; any number of rows gives the same, correct result.
            packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 64)
            cached = (self.weight, version, packed)
            self._packed = cached
        return _onednn_linear(x, cached[2], self.bias)
