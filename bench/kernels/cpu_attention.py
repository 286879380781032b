"""CPU paged attention: the torch reference (gather the blocks, then SDPA) against the native kernel.

``glmserve-bench cpu-attention [--batch 64] [--context 16:768] [--heads 8/2x64,32/2x128] [--prefill-lens ...]
[--dtype float32|bfloat16]`` builds a paged KV cache with blocks scattered through the pool, as the engine's are,
and times for one layer (1) one decode step of the batch and (2) the whole prefill of one prompt of each length,
both ways; it prints milliseconds per call, the ratio, the KV bytes read per second by the native decode kernel and
the largest |difference| between the two outputs (with bfloat16, up to one bf16 rounding step of the output). It
is the measurement behind ``kernels/cpu_attention.py``.
"""
from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass

import torch

from glmserve.kernels.cpu.attention import paged_decode_attention_cpu, paged_extend_attention_cpu
from glmserve.kernels.cpu.availability import native_cpu_available
from glmserve.kernels.reference.attention import paged_decode_attention_ref, paged_extend_attention_ref

from glmserve.bench.common.int_range import IntRange
from glmserve.bench.common.machine import cpu_model_name
from glmserve.bench.common.micro import time_ms, write_points

# glm-small's attention (8 query heads, 2 KV groups, head_dim 64) and ChatGLM3-6B's (32 / 2 / 128).
DEFAULT_HEADS = "8/2x64,32/2x128"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class AttentionPoint:
    dtype: str                   # of the query and the KV cache
    heads: int
    kv_heads: int
    head_dim: int
    batch: int
    context_tokens: int          # summed over the batch
    torch_ms: float
    native_ms: float
    speedup: float
    native_kv_gb_per_s: float    # K and V bytes of the batch's contexts / native time
    max_abs_diff: float


@dataclass
class PrefillPoint:
    dtype: str
    heads: int
    kv_heads: int
    head_dim: int
    prompt_tokens: int
    torch_ms: float              # SDPA over query tiles (the reference)
    native_ms: float             # the decode kernel, one query token per row
    speedup: float
    max_abs_diff: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=64, help="decode sequences in the step")
    parser.add_argument("--context", type=IntRange.parse, default=IntRange(16, 768),
                        help="context lengths, uniform in LOW:HIGH (default 16:768, the offline workload's span)")
    parser.add_argument("--heads", default=DEFAULT_HEADS, help="comma-separated H/KVHxD attention shapes")
    parser.add_argument("--prefill-lens", default="128,264,512,1024,2048",
                        help="comma-separated prompt lengths for the prefill table ('' for none)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="query and KV-cache type (bfloat16: what a bf16 model on the CPU runs)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)


def _paged_cache(num_tokens: int, kv_heads: int, head_dim: int, block_size: int, rows: int, gen: torch.Generator):
    """K and V caches with ``rows`` block-table rows of ``num_tokens`` tokens each, blocks scattered."""
    max_blocks = -(-num_tokens // block_size)
    k_cache = torch.randn(rows * max_blocks, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(rows * max_blocks, block_size, kv_heads, head_dim, generator=gen)
    block_tables = torch.randperm(rows * max_blocks, generator=gen).view(rows, max_blocks).to(torch.int32)
    return k_cache, v_cache, block_tables


def _operands(query_rows: int, heads: int, kv_heads: int, head_dim: int, num_tokens: int, cache_rows: int,
              args: argparse.Namespace, gen: torch.Generator):
    """(query [query_rows, heads, head_dim], k_cache, v_cache, block_tables) in --dtype; the query rows strided as
    the engine's are (views into the fused QKV projection)."""
    k_cache, v_cache, block_tables = _paged_cache(num_tokens, kv_heads, head_dim, args.block_size, cache_rows, gen)
    query = torch.randn(query_rows, heads + 2 * kv_heads, head_dim, generator=gen)[:, :heads]
    dtype = DTYPES[args.dtype]
    return query.to(dtype), k_cache.to(dtype), v_cache.to(dtype), block_tables


def _shape(text: str) -> tuple[int, int, int]:
    """'H/KVHxD' -> (heads, kv_heads, head_dim)."""
    try:
        groups, head_dim = text.split("x")
        heads, kv_heads = groups.split("/")
        shape = int(heads), int(kv_heads), int(head_dim)
    except ValueError:
        raise ValueError(f"an attention shape is H/KVHxD, e.g. 8/2x64; got {text!r}") from None
    if min(shape) < 1 or shape[0] % shape[1]:
        raise ValueError(f"need positive sizes with H a multiple of KVH, got {text!r}")
    return shape


def _lengths(text: str) -> list[int]:
    """'128,512' -> [128, 512]; '' -> []."""
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        lengths = [0]
    if any(n < 1 for n in lengths):
        raise ValueError(f"--prefill-lens takes comma-separated positive integers, got {text!r}")
    return lengths


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.inference_mode()
def measure(heads: int, kv_heads: int, head_dim: int, args: argparse.Namespace) -> AttentionPoint:
    rng = random.Random(args.seed)
    lens = [args.context.draw(rng) for _ in range(args.batch)]
    gen = torch.Generator().manual_seed(args.seed)
    query, k_cache, v_cache, block_tables = _operands(args.batch, heads, kv_heads, head_dim, max(lens), args.batch,
                                                      args, gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    scale = head_dim ** -0.5
    inputs = (query, k_cache, v_cache, block_tables, seq_lens, scale)
    diff = _max_abs_diff(paged_decode_attention_cpu(*inputs), paged_decode_attention_ref(*inputs))
    torch_ms = time_ms(lambda: paged_decode_attention_ref(*inputs), args.iterations)
    native_ms = time_ms(lambda: paged_decode_attention_cpu(*inputs), args.iterations)
    kv_bytes = 2 * sum(lens) * kv_heads * head_dim * k_cache.element_size()
    return AttentionPoint(args.dtype, heads, kv_heads, head_dim, args.batch, sum(lens), round(torch_ms, 3),
                          round(native_ms, 3), round(torch_ms / native_ms, 2), round(kv_bytes / native_ms / 1e6, 1),
                          diff)


@torch.inference_mode()
def measure_prefill(heads: int, kv_heads: int, head_dim: int, prompt: int, args: argparse.Namespace) -> PrefillPoint:
    gen = torch.Generator().manual_seed(args.seed)
    query, k_cache, v_cache, block_tables = _operands(prompt, heads, kv_heads, head_dim, prompt, 1, args, gen)
    inputs = (query, k_cache, v_cache, block_tables, torch.tensor([0, prompt], dtype=torch.int32),
              torch.tensor([prompt], dtype=torch.int32), head_dim ** -0.5)
    diff = _max_abs_diff(paged_extend_attention_cpu(*inputs), paged_extend_attention_ref(*inputs))
    iterations = max(2, args.iterations // 4)
    torch_ms = time_ms(lambda: paged_extend_attention_ref(*inputs), iterations)
    native_ms = time_ms(lambda: paged_extend_attention_cpu(*inputs), iterations)
    return PrefillPoint(args.dtype, heads, kv_heads, head_dim, prompt, round(torch_ms, 3), round(native_ms, 3),
                        round(torch_ms / native_ms, 2), diff)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        shapes = [_shape(text) for text in args.heads.split(",")]
        prefill_lens = _lengths(args.prefill_lens)
        if args.batch < 1 or args.block_size < 1 or args.iterations < 1:
            raise ValueError("--batch, --block-size and --iterations must be positive")
    except ValueError as error:
        print(f"glmserve-bench cpu-attention: error: {error}", file=sys.stderr)
        return 2
    if not native_cpu_available():
        print("glmserve-bench cpu-attention: error: the native CPU kernels did not build here (a C compiler is "
              "needed; GLMSERVE_NATIVE_CPU=0 turns them off)", file=sys.stderr)
        return 2
    print(f"cpu-attention: decode, {args.dtype}, batch {args.batch}, context {args.context}, block {args.block_size}, "
          f"{torch.get_num_threads()} threads on {cpu_model_name()}")
    print(f"{'H/KVHxD':>10} {'tokens':>7} {'torch ms':>9} {'native ms':>10} {'speed-up':>9} {'KV GB/s':>8} "
          f"{'max|diff|':>10}")
    points = []
    for heads, kv_heads, head_dim in shapes:
        p = measure(heads, kv_heads, head_dim, args)
        points.append(p)
        print(f"{f'{heads}/{kv_heads}x{head_dim}':>10} {p.context_tokens:>7} {p.torch_ms:>9.3f} {p.native_ms:>10.3f} "
              f"{p.speedup:>8.2f}x {p.native_kv_gb_per_s:>8.1f} {p.max_abs_diff:>10.2e}", flush=True)
    prefill = []
    if prefill_lens:
        print(f"prefill of one prompt (whole, causal), block {args.block_size}")
        print(f"{'H/KVHxD':>10} {'tokens':>7} {'SDPA ms':>9} {'native ms':>10} {'speed-up':>9} {'max|diff|':>10}")
    for heads, kv_heads, head_dim in shapes:
        for prompt in prefill_lens:
            p = measure_prefill(heads, kv_heads, head_dim, prompt, args)
            prefill.append(p)
            print(f"{f'{heads}/{kv_heads}x{head_dim}':>10} {prompt:>7} {p.torch_ms:>9.3f} {p.native_ms:>10.3f} "
                  f"{p.speedup:>8.2f}x {p.max_abs_diff:>10.2e}", flush=True)
    if args.out:
        write_points(args.out, points + prefill)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glmserve-bench cpu-attention", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
