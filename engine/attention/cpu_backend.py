"""The ``cpu`` backend: the native CPU library for the KV write, decode attention, the prefill/extend chunks of
short sequences and the model's fused norm/rotary/SwiGLU (``kernels/cpu/``; float32 and bfloat16), and oneDNN
linears, packed. Chunks of sequences longer than ``ROWWISE_EXTEND_MAX_CONTEXT`` stay on the torch path (SDPA,
tiled), as do operands the C code has no instance for (a float16 model)."""
from __future__ import annotations

import ctypes

import torch

from glmserve.kernels.cpu.attention import (ROWWISE_EXTEND_MAX_CONTEXT, paged_decode_attention_cpu,
                                            paged_extend_attention_cpu, supports, write_kv_cache_cpu)

from glmserve.engine.attention.layer_ops import NativeCpuLayerOps
from glmserve.engine.attention.torch_backend import TorchAttentionBackend


class CpuAttentionBackend(TorchAttentionBackend):
    """``lib``: the native library, built and self-checked (``kernels/cpu/availability.py``)."""

    name = "cpu"
    onednn_linears = True

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        self.ops = NativeCpuLayerOps(lib)

    def write(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        if not supports(key, k_cache) or key.stride() != value.stride():
            return super().write(key, value, k_cache, v_cache, slot_mapping)
        write_kv_cache_cpu(key, value, k_cache, v_cache, slot_mapping, lib=self.lib)

    def decode(self, query, k_cache, v_cache, block_tables, seq_lens, scale: float, *, max_seq_len: int,
               out: torch.Tensor) -> None:
        if not supports(query, k_cache):        # e.g. a float16 model on the CPU: the torch path handles it
            return super().decode(query, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len=max_seq_len,
                                  out=out)
        paged_decode_attention_cpu(query, k_cache, v_cache, block_tables, seq_lens, scale, out=out, lib=self.lib)

    def extend(self, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale: float, *,
               max_query_len: int, max_seq_len: int, out: torch.Tensor) -> None:
        # The longest of the extend sequences only (max_seq_len also counts the step's decodes).
        if not supports(query, k_cache) or int(seq_lens.max()) > ROWWISE_EXTEND_MAX_CONTEXT:
            return super().extend(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                                  max_query_len=max_query_len, max_seq_len=max_seq_len, out=out)
        paged_extend_attention_cpu(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, out=out,
                                   lib=self.lib)
