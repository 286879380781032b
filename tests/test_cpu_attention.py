"""kernels/cpu/attention.py: the native paged decode attention and KV write against the torch reference."""
from __future__ import annotations

import pytest
import torch

from glmserve.engine.attention import cpu_backend
from glmserve.engine.attention.cpu_backend import CpuAttentionBackend
from glmserve.kernels.cpu.attention import paged_decode_attention_cpu, paged_extend_attention_cpu, write_kv_cache_cpu
from glmserve.kernels.cpu.availability import checked_library, native_cpu_available
from glmserve.kernels.reference.attention import paged_decode_attention_ref, paged_extend_attention_ref, write_kv_cache_ref

pytestmark = pytest.mark.skipif(not native_cpu_available(),
                                reason="the native CPU kernels did not build here (no C compiler?)")


def _case(batch, heads, kv_heads, head_dim, block_size, lens, seed=0):
    """A scattered paged cache and strided query rows (as the engine's views into the fused QKV output)."""
    generator = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-length // block_size) for length in lens)
    num_blocks = batch * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator)
    block_tables = torch.randperm(num_blocks, generator=generator)[:batch * max_blocks].view(batch, max_blocks)
    query = torch.randn(batch, heads + 2 * kv_heads, head_dim, generator=generator)[:, :heads]
    return query, k_cache, v_cache, block_tables.to(torch.int32), torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [
    (4, 4, 32),      # no grouping
    (8, 2, 64),      # glm-small
    (32, 2, 128),    # ChatGLM3-6B: 16 query heads per KV group
    (4, 2, 20),      # head_dim not a multiple of 8: the portable path
])
@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("batch", [1, 3, 9])     # few sequences split by KV head; many go whole
def test_decode_matches_reference(heads, kv_heads, head_dim, block_size, batch):
    lens = [1, block_size, block_size + 1, 300, 77, 16, 2, 129, 45][:batch]
    args = _case(batch, heads, kv_heads, head_dim, block_size, lens, seed=batch)
    expected = paged_decode_attention_ref(*args, scale=head_dim ** -0.5)
    got = paged_decode_attention_cpu(*args, scale=head_dim ** -0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 64), (32, 2, 128), (4, 2, 20)])
@pytest.mark.parametrize("batch", [1, 9])
def test_bfloat16_decode_matches_the_reference_on_the_same_values(heads, kv_heads, head_dim, batch):
    """A bf16 model's cache is read as bf16 and widened: the same as the float32 reference on the widened values,
    up to the rounding of the output to bf16."""
    lens = [1, 16, 17, 300, 77, 16, 2, 129, 45][:batch]
    query, k_cache, v_cache, block_tables, seq_lens = _case(batch, heads, kv_heads, head_dim, 16, lens, seed=batch)
    query, k_cache, v_cache = query.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16()
    got = paged_decode_attention_cpu(query, k_cache, v_cache, block_tables, seq_lens, head_dim ** -0.5)
    expected = paged_decode_attention_ref(query.float(), k_cache.float(), v_cache.float(), block_tables, seq_lens,
                                          head_dim ** -0.5)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected.bfloat16(), rtol=2 ** -7, atol=1e-6)    # at most one bf16 step apart
    out = torch.empty(batch, heads, head_dim, dtype=torch.bfloat16)
    assert paged_decode_attention_cpu(query, k_cache, v_cache, block_tables, seq_lens, head_dim ** -0.5,
                                      out=out) is out and torch.equal(out, got)


def test_decode_refuses_a_cache_type_it_has_no_instance_for():
    query, k_cache, v_cache, block_tables, seq_lens = _case(2, 4, 2, 32, 16, [3, 3])
    with pytest.raises(TypeError, match="float32 or bfloat16 caches, got torch.float16"):
        paged_decode_attention_cpu(query.half(), k_cache.half(), v_cache.half(), block_tables, seq_lens, 0.2)


def test_decode_writes_into_out_and_handles_extreme_scores():
    query, k_cache, v_cache, block_tables, seq_lens = _case(4, 8, 2, 64, 16, [5, 40, 90, 1])
    query = query * 40          # scores in the hundreds: the max-subtraction must keep exp finite
    out = torch.full((4, 8, 64), float("nan"))
    result = paged_decode_attention_cpu(query, k_cache, v_cache, block_tables, seq_lens, 0.125, out=out)
    assert result is out and torch.isfinite(out).all()
    torch.testing.assert_close(out, paged_decode_attention_ref(query, k_cache, v_cache, block_tables, seq_lens, 0.125),
                               rtol=1e-4, atol=1e-4)


def test_decode_of_an_empty_batch_and_of_an_empty_context():
    query, k_cache, v_cache, block_tables, _ = _case(2, 4, 2, 32, 16, [3, 3])
    assert paged_decode_attention_cpu(query[:0], k_cache, v_cache, block_tables[:0],
                                      torch.zeros(0, dtype=torch.int32), 0.2).shape == (0, 4, 32)
    out = paged_decode_attention_cpu(query, k_cache, v_cache, block_tables, torch.tensor([0, 3], dtype=torch.int32), 0.2)
    assert torch.equal(out[0], torch.zeros(4, 32))        # nothing to attend to: zeros, not NaN


def test_decode_refuses_a_context_longer_than_its_block_table():
    query, k_cache, v_cache, block_tables, _ = _case(2, 4, 2, 32, 16, [20, 20])      # 2 blocks per row
    with pytest.raises(ValueError, match="needs more than the block table's 2 blocks of 16"):
        paged_decode_attention_cpu(query, k_cache, v_cache, block_tables, torch.tensor([20, 33], dtype=torch.int32), 0.2)


def test_decode_refuses_more_query_heads_than_it_has_room_for():
    query, k_cache, v_cache, block_tables, seq_lens = _case(1, 512, 1, 8, 16, [3])
    with pytest.raises(ValueError, match="at most 256 query heads, got 512"):
        paged_decode_attention_cpu(query, k_cache, v_cache, block_tables, seq_lens, 0.2)


def test_kv_write_matches_reference_and_skips_padding():
    generator = torch.Generator().manual_seed(3)
    qkv = torch.randn(6, 8 + 2 * 2, 32, generator=generator)           # [T, H + 2 KVH, D]
    key, value = qkv[:, 8:10], qkv[:, 10:12]                            # strided views, as the model passes them
    slots = torch.tensor([5, -1, 0, 63, 17, -1])
    k_cache, v_cache = torch.zeros(4, 16, 2, 32), torch.zeros(4, 16, 2, 32)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache_cpu(key, value, k_cache, v_cache, slots)
    write_kv_cache_ref(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert int((k_cache.abs().sum(-1).sum(-1) > 0).sum()) == 4          # exactly the four real tokens


def test_kv_write_copies_bfloat16_rows():
    qkv = torch.randn(3, 4 + 2 * 2, 32, generator=torch.Generator().manual_seed(4)).bfloat16()
    key, value = qkv[:, 4:6], qkv[:, 6:8]
    slots = torch.tensor([9, -1, 2])
    k_cache, v_cache = torch.zeros(2, 8, 2, 32, dtype=torch.bfloat16), torch.zeros(2, 8, 2, 32, dtype=torch.bfloat16)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache_cpu(key, value, k_cache, v_cache, slots)
    write_kv_cache_ref(key, value, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref) and k_cache.abs().sum() > 0


def test_kv_write_refuses_rows_of_another_type_than_the_cache():
    key = torch.randn(2, 2, 32)
    k_cache = torch.zeros(4, 16, 2, 32, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="must share one dtype"):
        write_kv_cache_cpu(key, key, k_cache, k_cache.clone(), torch.tensor([3, 4]))


def test_kv_write_refuses_a_slot_outside_the_cache():
    key = torch.randn(2, 2, 32)
    k_cache, v_cache = torch.zeros(4, 16, 2, 32), torch.zeros(4, 16, 2, 32)
    with pytest.raises(IndexError, match="outside the cache's 64 slots"):
        write_kv_cache_cpu(key, key, k_cache, v_cache, torch.tensor([3, 64]))


def _extend_case(chunks, lens, heads=8, kv_heads=2, head_dim=64, block_size=16):
    """Sequences whose last chunks[b] tokens (of lens[b]) are queries, back to back."""
    query, k_cache, v_cache, block_tables, seq_lens = _case(len(lens), heads, kv_heads, head_dim, block_size, lens)
    total = sum(chunks)
    generator = torch.Generator().manual_seed(7)
    flat_query = torch.randn(total, heads + 2 * kv_heads, head_dim, generator=generator)[:, :heads]
    starts = torch.tensor([0, *torch.tensor(chunks).cumsum(0).tolist()], dtype=torch.int32)
    return flat_query, k_cache, v_cache, block_tables, starts, seq_lens


@pytest.mark.parametrize("chunks, lens", [
    ([37], [37]),                        # a whole prompt
    ([5, 16, 1, 40], [5, 70, 33, 40]),   # whole prompts and chunks over cached prefixes (prefix hits, chunking)
    ([0, 9], [12, 9]),                   # a sequence with no query token in this step
])
def test_rowwise_extend_matches_reference(chunks, lens):
    args = _extend_case(chunks, lens)
    torch.testing.assert_close(paged_extend_attention_cpu(*args, scale=0.125),
                               paged_extend_attention_ref(*args, scale=0.125), rtol=1e-5, atol=1e-5)


def test_backend_sends_long_contexts_to_the_tiled_torch_path(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_backend, "ROWWISE_EXTEND_MAX_CONTEXT", 40)
    monkeypatch.setattr(cpu_backend, "paged_extend_attention_cpu",
                        lambda *a, **k: calls.append("rowwise") or paged_extend_attention_cpu(*a, **k))
    backend = CpuAttentionBackend(checked_library())

    def extend(case):
        out = torch.empty_like(case[0])
        backend.extend(*case, 0.125, max_query_len=16, max_seq_len=100, out=out)   # a longer decode elsewhere
        return out

    short = _extend_case([5, 16], [5, 40])
    long = _extend_case([5, 16], [5, 41])
    torch.testing.assert_close(extend(short), paged_extend_attention_ref(*short, 0.125))
    assert calls == ["rowwise"]
    torch.testing.assert_close(extend(long), paged_extend_attention_ref(*long, 0.125))
    assert calls == ["rowwise"]                 # 41 tokens: SDPA's tiles
