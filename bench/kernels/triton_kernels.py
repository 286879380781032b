"""Kernel benchmark (GPU only): the Triton paged-attention kernels at ChatGLM3 shapes against the memory roofline
and against torch SDPA on contiguous KV.

  python -m glmserve.bench.kernels.triton_kernels [--out kernels.json] [--peak-gbps 4800]

Decode: achieved bandwidth = KV bytes read / time, as a share of the card's peak bandwidth. Prefill: TFLOP/s of
causal attention. Both report SDPA's time on the same work divided by Triton's (>1: Triton is faster). Every
configuration also reports the largest difference between the two outputs, as a sanity check.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from glmserve.bench.common.output import output_path

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 2, 128, 16   # ChatGLM3-6B attention, the engine's block size
DTYPE = torch.bfloat16
DECODE_BATCHES = (1, 16, 64)
DECODE_CONTEXTS = (512, 4096, 32768)
# (name, batch, new tokens per sequence, context length per sequence)
PREFILL_CASES = (
    ("prefill 1x4096", 1, 4096, 4096),
    ("prefill 4x2048", 4, 2048, 2048),
    ("chunk 512 over 8192", 1, 512, 8192),
    ("chunk 8 over 32768", 1, 8, 32768),     # a prefix-cache hit: one query tile, split-KV spreads the keys
)
# Peak HBM bandwidth in GB/s, by a substring of torch.cuda.get_device_name(); the first match wins.
PEAK_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100", 2039.0))


def detect_peak_gbps(device_name: str) -> float | None:
    for key, gbps in PEAK_GBPS:
        if key in device_name:
            return gbps
    return None


def _fits(num_bytes: int, margin: float = 0.8) -> bool:
    free, _ = torch.cuda.mem_get_info()
    return num_bytes < margin * free


def _time_ms(fn) -> float:
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=100))


def _paged_copy(contiguous: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """[B, KVH, L, D] (L a multiple of BLOCK_SIZE) -> paged cache [num_blocks, BLOCK_SIZE, KVH, D] where the
    sequences' blocks, in order, are the cache blocks ``perm`` (a shuffled, non-contiguous layout)."""
    batch, kv_heads, length, dim = contiguous.shape
    blocks = contiguous.permute(0, 2, 1, 3).reshape(batch * length // BLOCK_SIZE, BLOCK_SIZE, kv_heads, dim)
    cache = torch.empty_like(blocks)
    cache[perm] = blocks
    return cache


def _random_kv(batch: int, length: int):
    """Contiguous K/V [B, KVH, L, D] and the same data as a paged cache with shuffled block tables [B, L/16]."""
    k = torch.randn(batch, NUM_KV_HEADS, length, HEAD_DIM, device="cuda", dtype=DTYPE)
    v = torch.randn_like(k)
    perm = torch.randperm(batch * length // BLOCK_SIZE, device="cuda")
    block_tables = perm.view(batch, length // BLOCK_SIZE).int()
    return k, v, _paged_copy(k, perm), _paged_copy(v, perm), block_tables


def _sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    # q: [B, H, n, D]; k, v: [B, KVH, L, D]. Grouped-query SDPA where torch supports it (>= 2.5), else repeated KV.
    try:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    except TypeError:
        group = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                              **kwargs)


def bench_decode(batch: int, context: int, peak_gbps: float | None) -> dict:
    from glmserve.kernels.triton.decode_attention import choose_num_splits, paged_decode_attention

    row = {"batch": batch, "context": context}
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize   # K and V, read once
    if not _fits(2 * kv_bytes):   # the paged cache plus the contiguous copy SDPA reads
        return {**row, "skipped": "does not fit in free GPU memory"}
    k, v, k_cache, v_cache, block_tables = _random_kv(batch, context)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    query = torch.randn(batch, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    scale = HEAD_DIM ** -0.5
    num_splits = choose_num_splits(batch, NUM_KV_HEADS, context, query.device)

    def triton_fn():
        return paged_decode_attention(query, k_cache, v_cache, block_tables, seq_lens, scale, num_splits=num_splits)

    def sdpa_fn():
        return _sdpa_gqa(query[:, :, None, :], k, v, scale=scale)[:, :, 0, :]

    diff = (triton_fn().float() - sdpa_fn().float()).abs().max().item()
    triton_ms, sdpa_ms = _time_ms(triton_fn), _time_ms(sdpa_fn)
    triton_gbps = kv_bytes / triton_ms / 1e6
    del k, v, k_cache, v_cache
    torch.cuda.empty_cache()
    return {**row, "num_splits": num_splits, "kv_bytes": kv_bytes,
            "triton_ms": triton_ms, "triton_gbps": triton_gbps,
            "peak_fraction": triton_gbps / peak_gbps if peak_gbps else None,
            "sdpa_ms": sdpa_ms, "sdpa_gbps": kv_bytes / sdpa_ms / 1e6,
            "speedup_vs_sdpa": sdpa_ms / triton_ms, "max_abs_diff": diff}


def _causal_pairs(new: int, context: int) -> int:
    """(query, key) pairs a chunk of ``new`` tokens at the end of ``context`` tokens attends to."""
    return new * (context - new) + new * (new + 1) // 2


def bench_prefill(name: str, batch: int, new: int, context: int) -> dict:
    from glmserve.kernels.triton.extend_attention import paged_extend_attention

    row = {"case": name, "batch": batch, "new_tokens": new, "context": context}
    group = NUM_HEADS // NUM_KV_HEADS
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    if not _fits(kv_bytes * (2 + group)):   # paged cache, contiguous copy, KV repeated for the masked SDPA
        return {**row, "skipped": "does not fit in free GPU memory"}
    k, v, k_cache, v_cache, block_tables = _random_kv(batch, context)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    query_start_loc = torch.arange(0, (batch + 1) * new, new, dtype=torch.int32, device="cuda")
    query = torch.randn(batch * new, NUM_HEADS, HEAD_DIM, device="cuda", dtype=DTYPE)
    scale = HEAD_DIM ** -0.5

    def triton_fn():
        return paged_extend_attention(query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, new)

    q = query.view(batch, new, NUM_HEADS, HEAD_DIM).transpose(1, 2)                   # [B, H, n, D]
    if new == context:
        def sdpa_fn():
            return _sdpa_gqa(q, k, v, is_causal=True, scale=scale)
    else:
        # A chunk's causal mask is aligned bottom-right (query i sits at position context - new + i).
        mask = torch.ones(new, context, dtype=torch.bool, device="cuda").tril(context - new)
        k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

        def sdpa_fn():
            return F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=mask, scale=scale)

    expected = sdpa_fn().transpose(1, 2).reshape(batch * new, NUM_HEADS, HEAD_DIM)
    diff = (triton_fn().float() - expected.float()).abs().max().item()
    triton_ms, sdpa_ms = _time_ms(triton_fn), _time_ms(sdpa_fn)
    flops = 4 * NUM_HEADS * HEAD_DIM * batch * _causal_pairs(new, context)   # QK^T and PV, 2 flops a MAC
    del k, v, k_cache, v_cache
    torch.cuda.empty_cache()
    return {**row, "flops": flops, "triton_ms": triton_ms, "triton_tflops": flops / triton_ms / 1e9,
            "sdpa_ms": sdpa_ms, "sdpa_tflops": flops / sdpa_ms / 1e9,
            "speedup_vs_sdpa": sdpa_ms / triton_ms, "max_abs_diff": diff}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_tables(result: dict) -> None:
    print(f"device: {result['device']}  peak: {_fmt(result['peak_gbps'], '.0f')} GB/s  dtype: {result['dtype']}")
    print(f"\n{'decode':<8}{'batch':>6}{'context':>8}{'splits':>7}{'ms':>9}{'GB/s':>8}{'%peak':>7}"
          f"{'sdpa ms':>9}{'x sdpa':>8}{'max diff':>10}")
    for r in result["decode"]:
        if "skipped" in r:
            print(f"{'':<8}{r['batch']:>6}{r['context']:>8}  skipped: {r['skipped']}")
            continue
        pct = None if r["peak_fraction"] is None else 100 * r["peak_fraction"]
        print(f"{'':<8}{r['batch']:>6}{r['context']:>8}{r['num_splits']:>7}{r['triton_ms']:>9.3f}"
              f"{r['triton_gbps']:>8.0f}{_fmt(pct, '.1f'):>7}{r['sdpa_ms']:>9.3f}{r['speedup_vs_sdpa']:>8.2f}"
              f"{r['max_abs_diff']:>10.1e}")
    print(f"\n{'prefill':<22}{'ms':>9}{'TFLOP/s':>9}{'sdpa ms':>9}{'sdpa TF/s':>10}{'x sdpa':>8}{'max diff':>10}")
    for r in result["prefill"]:
        if "skipped" in r:
            print(f"{r['case']:<22}  skipped: {r['skipped']}")
            continue
        print(f"{r['case']:<22}{r['triton_ms']:>9.3f}{r['triton_tflops']:>9.1f}{r['sdpa_ms']:>9.3f}"
              f"{r['sdpa_tflops']:>10.1f}{r['speedup_vs_sdpa']:>8.2f}{r['max_abs_diff']:>10.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glmserve.bench.kernels.triton_kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON to this path")
    parser.add_argument("--peak-gbps", type=float, help="peak memory bandwidth of the GPU (default: from its name)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("glmserve.bench.kernels.triton_kernels needs a CUDA GPU (the Triton kernels are benchmarked compiled); none found.",
              file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    peak = args.peak_gbps or detect_peak_gbps(name)
    torch.manual_seed(0)
    result = {"device": name, "peak_gbps": peak, "dtype": str(DTYPE).removeprefix("torch."),
              "shapes": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                         "block_size": BLOCK_SIZE},
              "decode": [bench_decode(b, c, peak) for b in DECODE_BATCHES for c in DECODE_CONTEXTS],
              "prefill": [bench_prefill(*case) for case in PREFILL_CASES]}
    print_tables(result)
    if args.out:
        with open(output_path(args.out), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
