"""Paged attention for one layer: the backends, each reading the pass's ``AttentionMetadata`` (metadata.py).

The model never sees requests: the model runner describes the flat batch in an ``AttentionMetadata`` and passes
it down with the forward call (``ForwardBatch``), so two engines in one process never see each other's.
"""
from __future__ import annotations

from typing import Protocol

import torch

from glmserve.kernels.cpu.attention import (ROWWISE_EXTEND_MAX_CONTEXT, paged_decode_attention_cpu,
                                            paged_extend_attention_cpu, supports, write_kv_cache_cpu)
from glmserve.kernels.cpu.native import ENV_SWITCH as NATIVE_SWITCH
from glmserve.kernels.cpu.native import native_cpu_available
from glmserve.kernels.reference.attention import (paged_decode_attention_ref, paged_extend_attention_ref,
                                        write_kv_cache_ref)

from glmserve.engine.attention.metadata import AttentionMetadata
from glmserve.engine.config.errors import ConfigError


class AttentionBackend(Protocol):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """query [T, H, D], key/value [T, KVH, D]; writes K/V to the cache, returns [T, H, D]."""
        ...


class TorchAttentionBackend:
    """The reference paged attention in plain torch: bounded memory for long prompts, runs anywhere."""

    name = "torch"

    def write(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        write_kv_cache_ref(key, value, k_cache, v_cache, slot_mapping)

    def decode(self, query, k_cache, v_cache, block_tables, seq_lens, scale: float) -> torch.Tensor:
        return paged_decode_attention_ref(query, k_cache, v_cache, block_tables, seq_lens, scale)

    def extend(self, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale: float) -> torch.Tensor:
        return paged_extend_attention_ref(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale)

    def forward(self, query, key, value, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        self.write(key, value, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decodes
        out = torch.empty_like(query)
        if nd:
            out[:nd] = self.decode(query[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale)
        if nd < query.shape[0]:
            starts = meta.query_start_loc[nd:] - nd
            out[nd:] = self.extend(query[nd:], k_cache, v_cache, meta.block_tables[nd:], starts,
                                   meta.seq_lens[nd:], scale)
        return out


class CpuAttentionBackend(TorchAttentionBackend):
    """The CPU default where the native kernels build: the KV write, decode attention and the prefill/extend chunks
    of short sequences run in native code (``kernels/cpu_attention.py``; float32 and bfloat16 caches), reading the
    paged cache in place; chunks of sequences longer than ``ROWWISE_EXTEND_MAX_CONTEXT`` stay on the torch path
    (SDPA, tiled)."""

    name = "cpu"

    def write(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        if not supports(key, k_cache) or key.stride() != value.stride():
            return super().write(key, value, k_cache, v_cache, slot_mapping)
        write_kv_cache_cpu(key, value, k_cache, v_cache, slot_mapping)

    def decode(self, query, k_cache, v_cache, block_tables, seq_lens, scale: float) -> torch.Tensor:
        if not supports(query, k_cache):        # e.g. a float16 model on the CPU: the torch path handles it
            return super().decode(query, k_cache, v_cache, block_tables, seq_lens, scale)
        return paged_decode_attention_cpu(query, k_cache, v_cache, block_tables, seq_lens, scale)

    def extend(self, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale: float) -> torch.Tensor:
        if not supports(query, k_cache) or int(seq_lens.max()) > ROWWISE_EXTEND_MAX_CONTEXT:
            return super().extend(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale)
        return paged_extend_attention_cpu(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale)


def check_cpu_backend(device: str) -> None:
    """Why attention_backend 'cpu' cannot run here, as a ConfigError (the engine config and the factory share it)."""
    if device != "cpu":
        raise ConfigError(f"attention_backend 'cpu' runs on the CPU only, got device {device!r}")
    if not native_cpu_available():
        raise ConfigError("attention_backend 'cpu' needs its native kernel, which did not build here (no C "
                          f"compiler, or {NATIVE_SWITCH}=0): use 'torch' or 'auto'")


def make_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """``auto`` picks Triton on CUDA, else the native CPU backend where it builds, else plain torch."""
    if name == "auto":
        if device.type == "cuda":
            name = "triton"
        else:
            name = "cpu" if native_cpu_available() else "torch"
    if name == "torch":
        return TorchAttentionBackend()
    if name == "cpu":
        check_cpu_backend(str(device))
        return CpuAttentionBackend()
    if name == "triton":
        from glmserve.engine.attention.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend()
    raise ValueError(f"attention_backend must be auto, torch, cpu or triton, got {name!r}")
