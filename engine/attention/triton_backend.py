"""The ``triton`` backend: the Triton kernels of ``kernels/triton`` for the KV write, decode and extend attention
(CUDA; the interpreter on the CPU in tests); the model's elementwise ops and linears stay torch. The kernel modules
(and triton) are imported when a backend is built, so this module imports on machines without triton.
"""
from __future__ import annotations

import os

import torch

from glmserve.engine.attention.backend import AttentionBackend
from glmserve.engine.attention.layer_ops import TORCH_LAYER_OPS


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    ops = TORCH_LAYER_OPS

    def __init__(self) -> None:
        from glmserve.kernels.triton.decode_attention import choose_num_splits, paged_decode_attention
        from glmserve.kernels.triton.extend_attention import paged_extend_attention
        from glmserve.kernels.triton.kv_cache_write import write_kv_cache
        self._choose_num_splits = choose_num_splits
        self._decode = paged_decode_attention
        self._extend = paged_extend_attention
        self._write = write_kv_cache

    # The CPU interpreter compiles nothing, so the start-up warm-up is skipped there (tests switch it on).
    warmup_in_interpreter = False

    def warmup_steps(self, num_heads: int, num_kv_heads: int, max_model_len: int):
        """Synthetic batches that launch every kernel variant (triton_warmup.py): the runner runs them at start-up."""
        from glmserve.engine.attention.triton_warmup import warmup_steps
        if os.environ.get("TRITON_INTERPRET") == "1" and not self.warmup_in_interpreter:
            return []
        return warmup_steps(num_heads, num_kv_heads, max_model_len)

    def write(self, key, value, k_cache, v_cache, slot_mapping) -> None:
        self._write(key, value, k_cache, v_cache, slot_mapping)

    def decode(self, query, k_cache, v_cache, block_tables, seq_lens, scale: float, *, max_seq_len: int,
               out: torch.Tensor) -> None:
        # The split count comes from max_seq_len: a CUDA-graph step passes the model length (a static grid); each
        # sequence then uses only the splits its own length fills, and the merge reads only those (split_kv.py).
        num_decodes = query.shape[0]
        num_splits = self._choose_num_splits(num_decodes, k_cache.shape[2], max_seq_len, query.device)
        self._decode(query, k_cache, v_cache, block_tables, seq_lens, scale, num_splits=num_splits, out=out)

    def extend(self, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale: float, *,
               max_query_len: int, max_seq_len: int, out: torch.Tensor) -> None:
        self._extend(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, max_query_len, out=out,
                     max_seq_len=max_seq_len)
