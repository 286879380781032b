"""Choosing the backend: ``EngineConfig.attention_backend`` names it once (auto | torch | cpu | triton) and the
engine builds it here, when the runner is made; ``auto`` is resolved then, not when the config is made, and building
a config compiles nothing.

- ``torch``: pure torch everywhere (attention, norms, rotary, SwiGLU, linears): the reference mode.
- ``cpu``: the native CPU library for attention, the KV write and the fused ops; oneDNN linears, packed.
- ``triton``: the Triton kernels (CUDA).
``auto`` picks ``triton`` on CUDA, else ``cpu`` where the native library is available (``GLMSERVE_NATIVE_CPU`` is
read now), else ``torch``.
"""
from __future__ import annotations

import torch

from glmserve.kernels.cpu import availability
from glmserve.kernels.cpu.native import ENV_SWITCH as NATIVE_SWITCH

from glmserve.engine.attention.backend import AttentionBackend
from glmserve.engine.attention.cpu_backend import CpuAttentionBackend
from glmserve.engine.attention.torch_backend import TorchAttentionBackend
from glmserve.engine.attention.triton_backend import TritonAttentionBackend
from glmserve.engine.config.engine_config import ATTENTION_BACKENDS
from glmserve.engine.config.errors import ConfigError


def resolve_backend_name(name: str, device: torch.device | str) -> str:
    """The concrete backend ``name`` means on ``device`` (``auto`` resolved)."""
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"attention_backend must be auto, torch, cpu or triton, got {name!r}")
    if name != "auto":
        return name
    if torch.device(device).type == "cuda":
        return "triton"
    return "cpu" if availability.native_cpu_available() else "torch"


def check_cpu_backend(device: torch.device | str) -> None:
    """Why attention_backend 'cpu' cannot run here, as a ConfigError."""
    if torch.device(device).type != "cpu":
        raise ConfigError(f"attention_backend 'cpu' runs on the CPU only, got device {str(device)!r}")
    if not availability.native_cpu_available():
        raise ConfigError("attention_backend 'cpu' needs its native kernel, which did not build here (no C "
                          f"compiler, or {NATIVE_SWITCH}=0): use 'torch' or 'auto'")


def check_triton_backend() -> None:
    """Why attention_backend 'triton' cannot run here, as a ConfigError: glmserve does not require triton (the CPU
    never runs it, and CUDA builds of torch install the release they were built with)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        raise ConfigError("attention_backend 'triton' needs the triton package, which CUDA builds of torch "
                          "install (pip install triton to run its kernels elsewhere)") from None


def check_backend(name: str, device: torch.device | str) -> str:
    """The concrete backend ``name`` means on ``device``, or a ConfigError saying why it cannot run there. Cheap
    enough to call before a model loads (the native library is built and checked once per process)."""
    name = resolve_backend_name(name, device)
    if name == "cpu":
        check_cpu_backend(device)
    if name == "triton":
        check_triton_backend()
    return name


def make_attention_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """Build the backend ``name`` for ``device`` (ConfigError where it cannot run there)."""
    name = check_backend(name, device)
    if name == "torch":
        return TorchAttentionBackend()
    if name == "cpu":
        return CpuAttentionBackend(availability.checked_library())
    return TritonAttentionBackend()
