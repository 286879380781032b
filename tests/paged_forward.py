"""Drive GLMForCausalLM directly over a paged KV cache, one sequence at a time, without the scheduler.

Blocks are taken from a shuffled pool so block tables are non-contiguous, as they are in the engine.
"""
from __future__ import annotations

import torch

from glmserve.engine.attention.backends import make_attention_backend
from glmserve.engine.attention.metadata import AttentionMetadata
from glmserve.engine.model.forward_batch import ForwardBatch
from glmserve.engine.worker.kv_cache import allocate_kv_caches
from glmserve.engine.model.glm import GLMForCausalLM


class PagedSequence:
    def __init__(self, model: GLMForCausalLM, block_size: int = 16, num_blocks: int = 64, seed: int = 0,
                 backend: str = "torch"):
        cfg = model.config
        dtype = model.weights_dtype
        device = model.weights_device
        self.caches = allocate_kv_caches(cfg, num_blocks, block_size, dtype, device)
        model.bind_runtime(make_attention_backend(backend, device), self.caches, cfg.seq_length)
        self.model, self.block_size, self.device = model, block_size, device
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.blocks: list[int] = []
        self.length = 0

    @torch.no_grad()
    def step(self, token_ids: list[int]) -> torch.Tensor:
        """Feed new tokens; returns float32 logits for each of them [n, vocab]."""
        n = len(token_ids)
        while len(self.blocks) * self.block_size < self.length + n:
            self.blocks.append(self.free.pop())
        positions = torch.arange(self.length, self.length + n, device=self.device)
        slots = torch.tensor([self.blocks[p // self.block_size] * self.block_size + p % self.block_size
                              for p in positions.tolist()], device=self.device)
        self.length += n
        meta = AttentionMetadata(
            slot_mapping=slots, query_start_loc=torch.tensor([0, n], dtype=torch.int32, device=self.device),
            seq_lens=torch.tensor([self.length], dtype=torch.int32, device=self.device),
            block_tables=torch.tensor([self.blocks], dtype=torch.int32, device=self.device),
            num_decodes=1 if n == 1 else 0, max_query_len=n, max_seq_len=self.length)
        hidden = self.model(torch.tensor(token_ids, device=self.device), positions, ForwardBatch(meta))
        return self.model.compute_logits(hidden)
