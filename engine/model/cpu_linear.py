"""Linear layers on the CPU through oneDNN: float32 instead of torch's default BLAS, and packed weights (float32
and bfloat16).

Why: torch's CPU ``F.linear``/``matmul`` call MKL's sgemm, which on this project's AMD EPYC machines runs
1.2-1.5x (layer shapes) to 2-4x (the 65024-row output layer at decode batch sizes) slower than oneDNN's matmul on
the same fp32 operands (bench/RESULTS.md, "oneDNN linears"). oneDNN computes in fp32 with fp32 accumulation:
results differ from MKL's only by summation order (|diff| ~1e-6 relative), and greedy outputs still equal HF.

``torch.ops.mkldnn._linear_pointwise`` is the op torch's own CPU compiler emits for linears; it is an internal
op, so ``onednn_linear_supported`` probes it once per process (present, runs, and agrees with ``F.linear``) and
everything falls back to ``F.linear`` where it is missing. Only the ``cpu`` backend asks for oneDNN linears
(``bind_linears``, when the model is bound); ``GLMSERVE_ONEDNN_LINEAR=0`` turns them off, read at that moment.

bfloat16 models: ``F.linear`` already runs oneDNN's bf16 matmul, so only the packing is added (1.2-2x on this
machine's layer shapes, identical results: ``glmserve-bench cpu-linear --dtype bfloat16``), where oneDNN has bf16
kernels for the CPU (``onednn_bf16_packing_supported``).
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
# From ~2^18 weight elements a packed weight is as fast as F.linear even for one row (512 x 512: 23 against 22 us;
# 768 x 512: 29 against 38 us; `glmserve-bench cpu-linear --rows 1,64`, bench/RESULTS.md) and faster with more;
# smaller layers (the tiny test model's) stay plain, where F.linear's lower per-call cost wins.
PACK_MIN_WEIGHT_ELEMENTS = 1 << 18
PACK_ROWS_HINT = 64


def onednn_linear_supported() -> bool:
    """Whether fp32 linears may run through oneDNN here: ``GLMSERVE_ONEDNN_LINEAR`` is not 0 (read now, every
    time) and this torch build's oneDNN linear runs and agrees with ``F.linear`` (probed once per process)."""
    return os.environ.get(ENV_SWITCH, "1") != "0" and _onednn_fp32_works()


def onednn_bf16_packing_supported() -> bool:
    """Whether bf16 weights can be packed: oneDNN's fp32 path may be used, it has bf16 kernels for this CPU, and a
    packed bf16 weight gives ``F.linear``'s result (probed once per process)."""
    return onednn_linear_supported() and _onednn_bf16_works()


@functools.lru_cache(maxsize=1)
def _onednn_fp32_works() -> bool:
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


@functools.lru_cache(maxsize=1)
def _onednn_bf16_works() -> bool:
    if not _onednn_fp32_works() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(5, 24, generator=generator).bfloat16()
        weight = torch.randn(40, 24, generator=generator).bfloat16()
        with torch.inference_mode():
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 5)
            return bool(torch.allclose(_onednn_linear(x, packed, None).float(), F.linear(x, weight).float(),
                                       rtol=2 ** -7, atol=1e-3))
    except Exception:   # noqa: BLE001 - as above: any failure means F.linear
        return False


def _packable(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or weight.numel() < PACK_MIN_WEIGHT_ELEMENTS:
        return False
    if weight.dtype == torch.float32:
        return onednn_linear_supported()
    return weight.dtype == torch.bfloat16 and onednn_bf16_packing_supported()


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ weight [out, in]^T (+ bias) -> [..., out]; ``weight`` may be a prepacked oneDNN tensor."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_pays_off(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # Inference only (the op has no backward), fp32 on the CPU only: other dtypes keep torch's numerics.
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.numel() * weight.shape[0] >= MIN_MULTIPLY_ADDS        # rows x in x out
            and not (torch.is_grad_enabled() and weight.requires_grad))


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and checkpoint names) whose CPU fp32 inference may run oneDNN's matmul.

    A plain ``F.linear`` until told otherwise: with ``use_onednn`` set (``bind_linears``, when the model is bound to
    the ``cpu`` backend) large fp32 matmuls run through oneDNN. ``pack()`` swaps the weight (float32 or bfloat16)
    for a copy reordered into oneDNN's blocked layout and drops the plain one (the same memory, as IPEX does for CPU
    inference): 1.1-1.6x faster than the weight as stored at 64 rows (``glmserve-bench cpu-linear``). A packed
    layer has no ``weight`` parameter until ``unpack()``; ``state_dict()`` still returns it in the plain layout.
    """

    _packed: torch.Tensor | None = None
    use_onednn: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None:
            if x.dtype != self._packed.dtype or x.device.type != "cpu":
                raise TypeError(f"this packed Linear takes {self._packed.dtype} CPU inputs, got {x.dtype} on "
                                f"{x.device.type}")
            return _onednn_linear(x, self._packed, self.bias)
        if self.use_onednn and _onednn_pays_off(x, self.weight):
            return _onednn_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def pack(self) -> bool:
        """Reorder the weight for oneDNN if this layer qualifies (float32, or bfloat16 where oneDNN has bf16
        kernels, on the CPU; a weight of at least ``PACK_MIN_WEIGHT_ELEMENTS``); returns whether the layer is
        packed. For inference only."""
        if self._packed is not None:
            return True
        weight = self.weight
        if not _packable(weight):
            return False
        # The batch-size hint only tunes the layout; any number of rows gives the same, correct result.
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)
        del self.weight                 # unregisters the parameter: the plain copy is freed
        return True

    def unpack(self) -> None:
        """Restore the plain ``weight`` parameter (exactly: the blocked copy holds the same values)."""
        if self._packed is not None:
            self.weight = nn.Parameter(self._packed.to_dense(), requires_grad=False)
            self._packed = None

    # state_dict() keeps the checkpoint's names and plain layout whether packed or not (benchmarks hand the weights
    # to HF); loading into a packed layer unpacks, loads and packs again.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._packed is not None:
            destination[prefix + "weight"] = self._packed.to_dense()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        repack = self._packed is not None
        self.unpack()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if repack:
            self.pack()

    def __getattr__(self, name: str):
        if name == "weight" and self.__dict__.get("_packed") is not None:
            raise AttributeError("this Linear's weight is packed for oneDNN (Linear.pack); unpack() restores it")
        return super().__getattr__(name)


def pack_linears(model: nn.Module) -> int:
    """Pack every qualifying ``Linear`` of ``model`` for CPU inference; returns how many were packed."""
    return sum(module.pack() for module in model.modules() if isinstance(module, Linear))


def bind_linears(model: nn.Module, onednn: bool) -> int:
    """Set how every ``Linear`` of ``model`` runs, as its backend asks: ``onednn`` (and oneDNN usable here, which
    reads ``GLMSERVE_ONEDNN_LINEAR`` now): large fp32 matmuls through oneDNN and qualifying weights packed; otherwise
    plain ``F.linear`` on plain weights (packed ones are unpacked). Returns how many layers are packed."""
    onednn = onednn and onednn_linear_supported()
    linears = [module for module in model.modules() if isinstance(module, Linear)]
    for layer in linears:
        layer.use_onednn = onednn
        if not onednn:
            layer.unpack()
    return pack_linears(model) if onednn else 0


def packed_weight_bytes(model: nn.Module) -> int:
    """Bytes held by packed weights of ``model`` (they are not parameters while packed)."""
    return sum(m._packed.numel() * m._packed.element_size()
               for m in model.modules() if isinstance(m, Linear) and m._packed is not None)
