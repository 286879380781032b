"""Paged decode attention on the CPU in native code (``kernels/cpu/csrc/paged_attention.c``, built by native.py).

Why: in torch, decode attention over a paged cache first gathers every sequence's blocks into a padded copy
(read, write, read again, plus padding); the kernel reads each cached K/V row once, in place, prefetching the
next block, and the G query heads of a group share each row while it is in L1.

Caches of float32 or bfloat16 (a bf16 model on the CPU: half the bytes to read, widened to float32 eight rows at a
time). The arithmetic is float32 either way: a bf16 query is widened first and the output rounded back to bf16.

Every function takes the loaded library as ``lib`` (the CPU backend passes the one it checked); without it they use
the process's ``native.library()`` (benchmarks, tests).
"""
from __future__ import annotations

import ctypes

import torch

from glmserve.kernels.cpu import native
from glmserve.kernels.reference.attention import paged_decode_attention_ref, write_kv_cache_ref

_MAX_HEADS = 256    # query heads the C code has room for (MAX_HEADS_PER_ITEM)
# Prefill/extend chunks of sequences up to this many tokens run through the decode kernel, one query token per
# row: each row re-reads its prefix, from L2 while the prefix is short, so no tiling is needed. Beyond that torch's
# SDPA, which tiles queries over each key block, catches up (`glmserve-bench cpu-attention`, prefill table, 2-core
# AMD EPYC, two runs: 1.05-1.9x faster than SDPA for 128-512-token prompts with glm-small's and ChatGLM3-6B's heads,
# about even at 1024, 0.8x at 2048 with glm-small's).
ROWWISE_EXTEND_MAX_CONTEXT = 1024


# Cache element type -> the C instance that reads it.
_DECODE_FUNCTIONS = {torch.float32: "glmserve_paged_decode_f32", torch.bfloat16: "glmserve_paged_decode_bf16"}


def supports(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the native kernel handles these operands (on the CPU, float32 or bfloat16 with the query of the
    cache's type, head_dim contiguous, H <= 256)."""
    return (query.device.type == "cpu" and k_cache.dtype in _DECODE_FUNCTIONS and query.dtype == k_cache.dtype
            and query.stride(-1) == 1 and query.shape[1] <= _MAX_HEADS)


def paged_decode_attention_cpu(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                               out: torch.Tensor | None = None, lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Same contract as ``paged_decode_attention_ref``: query [B, H, D] (head_dim contiguous, rows may be strided),
    caches [num_blocks, block_size, KVH, D], block_tables [B, max_blocks] int32, seq_lens [B] int32 -> [B, H, D]
    of the query's dtype. ``out`` ([B, H, D] of the query's dtype) is written in place and returned when given."""
    lib = native.library() if lib is None else lib
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available")
    if k_cache.dtype not in _DECODE_FUNCTIONS or v_cache.dtype != k_cache.dtype:
        raise TypeError(f"native CPU attention reads float32 or bfloat16 caches, got {k_cache.dtype}/{v_cache.dtype}")
    result_dtype = query.dtype
    if query.dtype != torch.float32:          # [B, H, D] is small next to the cache: widen it once
        query = query.float()
    batch, num_heads, head_dim = query.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    # The kernel writes float32 rows: into ``out`` itself where it is a contiguous float32 tensor.
    direct = out is not None and out.dtype == torch.float32 and out.is_contiguous()
    result = out if direct else torch.empty(query.shape, dtype=torch.float32)
    if batch == 0:
        return _finish(result, out, result_dtype)
    # Contiguity, dtypes and strides are what the C code assumes; these are no-ops on the engine's tensors.
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    block_tables = block_tables.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    longest = int(seq_lens.max())
    if longest > block_tables.shape[1] * block_size:     # the C code would read past the table
        raise ValueError(f"a sequence of {longest} tokens needs more than the block table's "
                         f"{block_tables.shape[1]} blocks of {block_size}")
    status = getattr(lib, _DECODE_FUNCTIONS[k_cache.dtype])(
        query.data_ptr(), query.stride(0), query.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
        block_tables.data_ptr(), seq_lens.data_ptr(), result.data_ptr(), batch, num_heads, num_kv_heads, head_dim,
        block_size, block_tables.shape[1], float(scale), torch.get_num_threads())
    if status == 2:
        raise ValueError(f"native CPU attention takes at most {_MAX_HEADS} query heads, got {num_heads}")
    if status != 0:
        raise MemoryError("native CPU attention could not allocate its score buffer")
    return _finish(result, out, result_dtype)


def _finish(result: torch.Tensor, out: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The float32 result in the caller's ``out``, or as a new tensor of ``dtype``."""
    if out is None:
        return result.to(dtype)
    if out is not result:
        out.copy_(result)
    return out


def paged_extend_attention_cpu(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                               scale: float, out: torch.Tensor | None = None,
                               lib: ctypes.CDLL | None = None) -> torch.Tensor:
    """Same contract as ``paged_extend_attention_ref`` (query [T, H, D]: each sequence's last n_b tokens, back to
    back), computed row by row with the decode kernel: query token i of sequence b attends to the first
    ``position + 1`` cached tokens of b. For short contexts (``ROWWISE_EXTEND_MAX_CONTEXT``). ``out`` as for
    ``paged_decode_attention_cpu``."""
    starts = query_start_loc.long()
    tokens = int(starts[-1])            # rows of query past it are padding (slot -1): left unwritten
    per_seq = starts[1:] - starts[:-1]                                            # [B] query tokens per sequence
    row_seq = torch.repeat_interleave(torch.arange(per_seq.shape[0]), per_seq, output_size=tokens)  # [T]
    offset_in_chunk = torch.arange(tokens) - starts[row_seq]
    row_lens = seq_lens.long()[row_seq] - per_seq[row_seq] + offset_in_chunk + 1  # causal: keys 0 .. position
    block_size = k_cache.shape[1]
    used_blocks = -(-int(seq_lens.max()) // block_size) if tokens else 0
    if out is None:
        out = query.new_empty(query.shape)
    paged_decode_attention_cpu(query[:tokens], k_cache, v_cache, block_tables[row_seq, :used_blocks], row_lens, scale,
                               out=out[:tokens], lib=lib)
    return out


def write_kv_cache_cpu(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor, lib: ctypes.CDLL | None = None) -> None:
    """Same contract as ``write_kv_cache_ref``: key, value [T, KVH, D] (D contiguous, the same strides),
    slot_mapping [T] (-1 = padding, skipped); caches contiguous, of key's dtype (any). Writes in place."""
    if (key.stride() != value.stride() or key.stride(-1) != 1
            or not (k_cache.is_contiguous() and v_cache.is_contiguous())):
        raise ValueError("write_kv_cache_cpu: key/value need equal strides with head_dim contiguous, caches contiguous")
    if not key.dtype == value.dtype == k_cache.dtype == v_cache.dtype:
        raise TypeError(f"write_kv_cache_cpu: key/value {key.dtype}/{value.dtype} and caches "
                        f"{k_cache.dtype}/{v_cache.dtype} must share one dtype")
    slots = slot_mapping.to(torch.int64).contiguous()
    tokens, num_kv_heads, head_dim = key.shape
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    lib = native.library() if lib is None else lib
    if lib is None:
        raise RuntimeError("the native CPU kernels are not available")
    bad = lib.glmserve_write_kv(key.data_ptr(), value.data_ptr(), key.stride(0), key.stride(1),
                                      slots.data_ptr(), tokens, num_kv_heads, head_dim, k_cache.data_ptr(),
                                      v_cache.data_ptr(), num_slots, key.element_size())
    if bad:
        raise IndexError(f"write_kv_cache_cpu: {bad} slot(s) outside the cache's {num_slots} slots")


def self_check(lib: ctypes.CDLL) -> bool:
    """Whether ``lib`` agrees with the torch reference on a small case (float32 and bfloat16 caches): partial
    blocks, scattered blocks, strided rows."""
    generator = torch.Generator().manual_seed(0)
    k_cache = torch.randn(6, 4, 2, 24, generator=generator)
    v_cache = torch.randn(6, 4, 2, 24, generator=generator)
    query = torch.randn(3, 16, 24, generator=generator)[:, :8]        # rows strided, as the engine's views are
    block_tables = torch.tensor([[5, 0, 2], [1, 3, 0], [4, 0, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([11, 5, 1], dtype=torch.int32)
    expected = paged_decode_attention_ref(query, k_cache, v_cache, block_tables, seq_lens, 0.3)
    got = paged_decode_attention_cpu(query, k_cache, v_cache, block_tables, seq_lens, 0.3, lib=lib)
    ok = torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    halves = [t.bfloat16() for t in (query, k_cache, v_cache)]              # the bfloat16 instance
    got = paged_decode_attention_cpu(*halves, block_tables, seq_lens, 0.3, lib=lib)
    expected = paged_decode_attention_ref(*(t.float() for t in halves), block_tables, seq_lens, 0.3)
    ok = ok and torch.allclose(got.float(), expected, rtol=2 ** -7, atol=1e-5)
    kv = torch.randn(3, 4, 2, 24, generator=generator)                 # [T, K|V|.., KVH, D]: strided views
    slots = torch.tensor([7, -1, 20])
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(kv[:, 0], kv[:, 1], expected_k, expected_v, slots)
    write_kv_cache_cpu(kv[:, 0], kv[:, 1], k_cache, v_cache, slots, lib=lib)
    return bool(ok and torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v))
