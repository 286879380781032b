"""The attention-backend interface: one class owns the step's order (write K/V, decode, extend); each backend
supplies the three kernels, and the elementwise ops and linear mode the model runs with when bound to it.

The model never sees requests: the model runner describes the flat batch in an ``AttentionMetadata`` and passes
it down with the forward call (``ForwardBatch``), so two engines in one process never see each other's.
"""
from __future__ import annotations

import torch

from glmserve.engine.attention.layer_ops import LayerOps
from glmserve.engine.attention.metadata import AttentionMetadata


class AttentionBackend:
    """Paged attention for one layer over a flat batch whose first ``meta.num_decodes`` sequences have one query
    token each (decode) and whose others have chunks (prefill / extend).

    Subclasses implement ``write``, ``decode`` and ``extend``; ``decode`` and ``extend`` write their result into
    ``out`` (a slice of the step's output). No host synchronisation here, so a captured CUDA graph replays it.
    """

    name: str
    ops: LayerOps                 # norms, rotary and SwiGLU of the model bound to this backend
    onednn_linears: bool = False  # whether that model's linears run (packed) through oneDNN

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """query: [T, H, D]; key, value: [T, KVH, D]; caches: [num_blocks, block_size, KVH, D].

        Writes this step's K/V into the caches, then attends. Returns [T, H, D]; rows of padding tokens past
        ``query_start_loc[-1]`` are left unwritten.
        """
        self.write(key, value, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(query)
        num_decodes = meta.num_decodes
        num_seqs = meta.seq_lens.shape[0]
        if num_decodes > 0:
            # Decode sequences have one token each, so tokens [0:num_decodes] are theirs.
            self.decode(query[:num_decodes], k_cache, v_cache, meta.block_tables[:num_decodes],
                        meta.seq_lens[:num_decodes], scale, max_seq_len=meta.max_seq_len, out=out[:num_decodes])
        if num_seqs > num_decodes:
            # Rebase the extend sequences' token offsets onto query[num_decodes:] (no host sync needed).
            query_start_loc = meta.query_start_loc[num_decodes:] - num_decodes
            self.extend(query[num_decodes:], k_cache, v_cache, meta.block_tables[num_decodes:], query_start_loc,
                        meta.seq_lens[num_decodes:], scale, max_query_len=meta.max_query_len,
                        max_seq_len=meta.max_seq_len, out=out[num_decodes:])
        return out

    def write(self, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
        """key, value [T, KVH, D] into the caches at ``slot_mapping`` [T] (-1: padding, not written)."""
        raise NotImplementedError

    def decode(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
               seq_lens: torch.Tensor, scale: float, *, max_seq_len: int, out: torch.Tensor) -> None:
        """One query token per sequence, query [B, H, D], over its ``seq_lens[b]`` cached tokens -> out [B, H, D]."""
        raise NotImplementedError

    def extend(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
               query_start_loc: torch.Tensor, seq_lens: torch.Tensor, scale: float, *, max_query_len: int,
               max_seq_len: int, out: torch.Tensor) -> None:
        """Each sequence's last n_b tokens, back to back in query [T', H, D] (``query_start_loc`` [B'+1] from 0),
        attending causally over the cache -> out [T', H, D] (rows past ``query_start_loc[-1]`` untouched)."""
        raise NotImplementedError
