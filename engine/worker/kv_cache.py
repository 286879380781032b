"""The paged KV cache of every layer, allocated in one place."""
from __future__ import annotations

import torch

from glmserve.engine.config.model_config import ModelConfig

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


def allocate_kv_caches(config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> KVCache:
    """One zeroed (K, V) pair per layer, each [num_blocks, block_size, num_kv_heads, head_dim]; ``config`` holds
    this rank's share of the KV heads under tensor parallelism."""
    shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(config.num_layers)]


def kv_cache_bytes(caches: KVCache) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in caches)
