"""The Triton attention backend: the same interface as the engine's torch backend, running the kernels of this
package. The kernel modules (and triton) are imported when a backend is built, so ``glmserve.kernels`` imports
on machines without triton.
"""
from __future__ import annotations

import torch


class TritonAttentionBackend:
    """Writes the step's K/V into the paged cache, then runs decode attention over the batch's first
    ``meta.num_decodes`` sequences (one query token each) and extend attention over the rest."""

    name = "triton"

    def __init__(self) -> None:
        from glmserve.kernels.triton.decode_attention import choose_num_splits, paged_decode_attention
        from glmserve.kernels.triton.extend_attention import paged_extend_attention
        from glmserve.kernels.triton.kv_cache_write import write_kv_cache
        self._choose_num_splits = choose_num_splits
        self._decode = paged_decode_attention
        self._extend = paged_extend_attention
        self._write = write_kv_cache

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta, scale: float) -> torch.Tensor:
        """query: [T, H, D]; key, value: [T, KVH, D]; caches: [num_blocks, block_size, KVH, D].

        ``meta``: slot_mapping [T] int64, query_start_loc [B+1] int32, seq_lens [B] int32, block_tables [B, M]
        int32, num_decodes, max_query_len, max_seq_len. Returns [T, H, D]; rows of padding tokens past
        ``query_start_loc[-1]`` are left unwritten.
        """
        self._write(key, value, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(query)
        num_decodes = meta.num_decodes
        num_seqs = meta.seq_lens.shape[0]
        if num_decodes > 0:
            # Decode sequences have one token each, so tokens [0:num_decodes] are theirs.
            num_splits = self._choose_num_splits(num_decodes, k_cache.shape[2], meta.max_seq_len, query.device)
            self._decode(query[:num_decodes], k_cache, v_cache, meta.block_tables[:num_decodes],
                         meta.seq_lens[:num_decodes], scale, num_splits=num_splits, out=out[:num_decodes])
        if num_seqs > num_decodes:
            # Rebase the extend sequences' token offsets onto query[num_decodes:] (no host sync needed).
            query_start_loc = meta.query_start_loc[num_decodes:] - num_decodes
            self._extend(query[num_decodes:], k_cache, v_cache, meta.block_tables[num_decodes:], query_start_loc,
                         meta.seq_lens[num_decodes:], scale, meta.max_query_len, out=out[num_decodes:],
                         max_seq_len=meta.max_seq_len)
        return out
