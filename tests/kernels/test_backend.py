"""TritonAttentionBackend.forward against the reference path on one mixed batch: decodes first, then prefill
chunks over cached prefixes and a full prefill, then padding tokens (slot -1)."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import torch

from glmserve.engine.attention.triton_backend import TritonAttentionBackend
from glmserve.kernels.reference.attention import paged_decode_attention_ref, paged_extend_attention_ref, write_kv_cache_ref

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 2, 128, 16


def test_backend_forward_matches_reference_path(paged_kv, check_close, device):
    seq_lens = [1, 17, 257, 107, 64]          # after this step
    query_lens = [1, 1, 1, 7, 64]             # three decodes, a chunk over a cached prefix, a full prefill
    num_decodes, num_padding = 3, 2
    kv = paged_kv(seq_lens, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, torch.float16)

    # This step's tokens are the last query_lens[b] of each sequence: take their K/V out of the cache (the
    # backend must write them back) and add padding tokens.
    flat_k = kv.k_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)
    flat_v = kv.v_cache.view(-1, NUM_KV_HEADS, HEAD_DIM)
    new_slots = torch.cat([slots[-n:] for slots, n in zip(kv.slots, query_lens)]).to(device)
    key = torch.cat([flat_k[new_slots], torch.randn(num_padding, NUM_KV_HEADS, HEAD_DIM, device=device).half()])
    value = torch.cat([flat_v[new_slots], torch.randn(num_padding, NUM_KV_HEADS, HEAD_DIM, device=device).half()])
    flat_k[new_slots] = 0
    flat_v[new_slots] = 0
    slot_mapping = torch.cat([new_slots, torch.full((num_padding,), -1, device=device)])
    num_tokens = slot_mapping.shape[0]
    query = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, device=device).half()
    query_start_loc = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.tensor(query_lens).cumsum(0)
    meta = SimpleNamespace(slot_mapping=slot_mapping, query_start_loc=query_start_loc.to(device),
                           seq_lens=kv.seq_lens, block_tables=kv.block_tables, num_decodes=num_decodes,
                           max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    scale = HEAD_DIM ** -0.5

    k_ref, v_ref = kv.k_cache.clone(), kv.v_cache.clone()
    write_kv_cache_ref(key, value, k_ref, v_ref, slot_mapping)
    expected_decode = paged_decode_attention_ref(query[:num_decodes], k_ref, v_ref, kv.block_tables[:num_decodes],
                                                 kv.seq_lens[:num_decodes], scale)
    expected_extend = paged_extend_attention_ref(query[num_decodes:], k_ref, v_ref, kv.block_tables[num_decodes:],
                                                 meta.query_start_loc[num_decodes:] - num_decodes,
                                                 kv.seq_lens[num_decodes:], scale)

    out = TritonAttentionBackend().forward(query, key, value, kv.k_cache, kv.v_cache, meta, scale)
    assert torch.equal(kv.k_cache, k_ref) and torch.equal(kv.v_cache, v_ref)
    num_real = int(query_start_loc[-1])
    check_close(out[:num_decodes], expected_decode)
    check_close(out[num_decodes:num_real], expected_extend[:num_real - num_decodes])


def test_backend_module_imports_without_triton():
    # The engine core imports glmserve.engine.attention.triton_backend on machines without triton; only building it needs triton.
    code = ("import sys; sys.modules['triton'] = None\n"
            "from glmserve.engine.attention.triton_backend import TritonAttentionBackend\n"
            "try:\n    TritonAttentionBackend()\nexcept ImportError:\n    print('needs triton')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "needs triton"
