"""CUDA memory profiling: how much one full-size forward pass needs beside the weights."""
from __future__ import annotations

import torch

from glmserve.engine.attention.backends import make_attention_backend
from glmserve.engine.attention.metadata import AttentionMetadata
from glmserve.engine.model.forward_batch import ForwardBatch
from glmserve.engine.worker.kv_cache import allocate_kv_caches, kv_cache_bytes


@torch.inference_mode()
def peak_forward_memory(model, num_tokens: int, block_size: int, backend_name: str) -> int:
    """Peak allocated bytes (weights included, the temporary KV cache excluded) of a forward over
    ``num_tokens`` prompt tokens plus their logits."""
    cfg = model.config
    device = model.weights_device
    dtype = model.weights_dtype
    num_blocks = -(-num_tokens // block_size)
    caches = allocate_kv_caches(cfg, num_blocks, block_size, dtype, device)
    cache_bytes = kv_cache_bytes(caches)
    model.bind_runtime(make_attention_backend(backend_name, device), caches, num_tokens)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens, device=device),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        num_decodes=0, max_query_len=num_tokens, max_seq_len=num_tokens)
    hidden = model(torch.zeros(num_tokens, dtype=torch.long, device=device), torch.arange(num_tokens, device=device),
                   ForwardBatch(meta))
    model.compute_logits(hidden[-min(num_tokens, 256):])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - cache_bytes
    del caches
    torch.cuda.empty_cache()
    return peak
