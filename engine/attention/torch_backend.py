"""The ``torch`` backend: pure torch everywhere, the reference mode. Paged attention and the KV write from
``kernels/reference/attention.py`` (bounded memory for long prompts, runs on any device), the model's elementwise
ops from ``kernels/reference/fused_ops.py``, linears as plain ``F.linear``: no native code, no oneDNN packing."""
from __future__ import annotations

import torch

from glmserve.kernels.reference.attention import (paged_decode_attention_ref, paged_extend_attention_ref,
                                                  write_kv_cache_ref)

from glmserve.engine.attention.backend import AttentionBackend
from glmserve.engine.attention.layer_ops import TORCH_LAYER_OPS


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    ops = TORCH_LAYER_OPS

    def write(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        write_kv_cache_ref(key, value, k_cache, v_cache, slot_mapping)

    def decode(self, query, k_cache, v_cache, block_tables, seq_lens, scale: float, *, max_seq_len: int,
               out: torch.Tensor) -> None:
        out.copy_(paged_decode_attention_ref(query, k_cache, v_cache, block_tables, seq_lens, scale))

    def extend(self, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale: float, *,
               max_query_len: int, max_seq_len: int, out: torch.Tensor) -> None:
        out.copy_(paged_extend_attention_ref(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
                                             scale))
