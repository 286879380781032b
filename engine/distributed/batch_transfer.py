"""One step's flat batch as one int64 tensor, so rank 0 sends it to the workers with a single broadcast.

The sizes travel ahead in a small ``StepHeader`` (over each worker's command pipe) so that a worker can allocate
the receive buffer; the tensors themselves are broadcast over the process group (NCCL on GPUs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from glmserve.engine.attention.metadata import AttentionMetadata
from glmserve.engine.worker.model_runner import ModelInputs


@dataclass(frozen=True)
class StepHeader:
    num_tokens: int         # T
    num_seqs: int           # B
    max_blocks: int         # block table width
    num_logits: int         # S: rows projected to logits
    num_decodes: int
    max_query_len: int
    max_seq_len: int

    @property
    def payload_size(self) -> int:
        t, b = self.num_tokens, self.num_seqs
        # input_ids, positions, slot_mapping [T] | query_start_loc [B+1] | seq_lens [B] | block_tables [B*M] | [S]
        return 3 * t + (b + 1) + b + b * self.max_blocks + self.num_logits


def pack_inputs(inputs: ModelInputs) -> tuple[StepHeader, torch.Tensor]:
    meta = inputs.attention
    header = StepHeader(num_tokens=inputs.input_ids.numel(), num_seqs=meta.seq_lens.numel(),
                        max_blocks=meta.block_tables.shape[1], num_logits=inputs.logits_indices.numel(),
                        num_decodes=meta.num_decodes, max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len)
    parts = (inputs.input_ids, inputs.positions, meta.slot_mapping, meta.query_start_loc, meta.seq_lens,
             meta.block_tables.flatten(), inputs.logits_indices)
    return header, torch.cat([p.to(torch.int64) for p in parts])


def unpack_inputs(header: StepHeader, payload: torch.Tensor) -> ModelInputs:
    t, b, m = header.num_tokens, header.num_seqs, header.max_blocks
    ids, positions, slots, starts, seq_lens, tables, logits_indices = payload.split(
        (t, t, t, b + 1, b, b * m, header.num_logits))
    meta = AttentionMetadata(slot_mapping=slots, query_start_loc=starts.to(torch.int32),
                             seq_lens=seq_lens.to(torch.int32), block_tables=tables.to(torch.int32).view(b, m),
                             num_decodes=header.num_decodes, max_query_len=header.max_query_len,
                             max_seq_len=header.max_seq_len)
    return ModelInputs(ids, positions, meta, logits_indices)
