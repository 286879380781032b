"""Kernel benchmark (GPU only): the Triton paged-attention kernels at ChatGLM3-6B shapes, timed on the GPU, against
the memory roofline, the bandwidth model's predictions and torch SDPA on contiguous KV.

  python -m glmserve.bench.kernels.triton_kernels [--out kernels.json] [--peak-gbps 3350]

Timing: ``triton.testing.do_bench_cudagraph`` (replays of a captured graph: GPU time, not the 25-40 us of host
work per eager launch). Each timed call reads a fresh copy of the KV (replicas rotated so at least 256 MB is
touched between two reads of the same bytes), so small cases measure HBM, not the 50 MB L2.
Decode is timed with the split counts the engine picks: ``eager`` from the step's context (the backend passes the
batch's longest context), ``graph`` from the 32K model's length (a CUDA-graph step's static grid: sequences fill
only the splits their length needs), and ``2/SM`` with the reviewed heuristic (2 programs per SM, 256 tokens a
split) on the same kernel, which tests the 4-programs-per-SM choice. Achieved bandwidth = KV bytes / time.
Prefill: TFLOP/s of causal attention. Every configuration also reports the largest difference from SDPA.
The JSON file is rewritten after every measured point, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F

from glmserve.bench.common.output import output_path

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 2, 128, 16   # ChatGLM3-6B attention, the engine's block size
DTYPE = torch.bfloat16
DEVICE = "cuda"                  # (tests/test_bench_triton_kernels.py runs the same code in the CPU interpreter)
GRAPH_MODEL_LEN = 32768          # chatglm3-6b-32k: the CUDA-graph path's split count comes from it
DECODE_BATCHES = (1, 16, 64)
DECODE_CONTEXTS = (1024, 32768)
# (name, batch, new tokens per sequence, context length per sequence)
PREFILL_CASES = (
    ("prefill 1x4096", 1, 4096, 4096),
    ("chunk 512 over 8192", 1, 512, 8192),
    ("chunk 8 over 32768", 1, 8, 32768),     # a prefix-cache hit: one query tile, split-KV spreads the keys
)
TOUCHED_BYTES = 256 * 2**20      # bytes read between two reads of the same KV (L2 is 50 MB)
MAX_REPLICAS = 128
# Peak HBM bandwidth in GB/s, by a substring of torch.cuda.get_device_name(); the first match wins.
PEAK_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100", 2039.0))


def detect_peak_gbps(device_name: str) -> float | None:
    for key, gbps in PEAK_GBPS:
        if key in device_name:
            return gbps
    return None


def _fits(num_bytes: int, margin: float = 0.7) -> bool:
    if DEVICE != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info()
    return num_bytes < margin * free


def _replicas(kv_bytes: int) -> int:
    return max(1, min(MAX_REPLICAS, -(-TOUCHED_BYTES // max(1, kv_bytes))))


def _time_ms(fn, calls: int) -> float:
    """GPU milliseconds of one of ``calls`` calls made by ``fn`` (do_bench_cudagraph: replayed graphs)."""
    import triton.testing
    return float(triton.testing.do_bench_cudagraph(fn, rep=20)) / calls


class PagedReplicas:
    """``replicas`` copies of a batch's K/V in one paged cache [num_blocks, BLOCK_SIZE, KVH, D], each copy's
    blocks shuffled (non-contiguous), with its block tables [B, L / BLOCK_SIZE]."""

    def __init__(self, batch: int, length: int, replicas: int, table_width: int | None = None):
        blocks = length // BLOCK_SIZE
        total = replicas * batch * blocks
        self.k_cache = torch.randn(total, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
        self.v_cache = torch.randn_like(self.k_cache)
        order = torch.randperm(total, device=DEVICE).int().view(replicas, batch, blocks)
        width = max(blocks, table_width or 0)      # a CUDA-graph step's table is as wide as the model length
        self.tables = torch.zeros(replicas, batch, width, dtype=torch.int32, device=DEVICE)
        self.tables[:, :, :blocks] = order
        self.batch, self.length, self.replicas = batch, length, replicas

    def contiguous(self, cache: torch.Tensor, replica: int) -> torch.Tensor:
        """Replica ``replica`` of ``cache`` as contiguous [B, KVH, L, D] (what SDPA reads)."""
        blocks = cache[self.tables[replica, :, :self.length // BLOCK_SIZE].long()]   # [B, nb, bs, KVH, D]
        return blocks.flatten(1, 2).permute(0, 2, 1, 3).contiguous()


def _sdpa_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs) -> torch.Tensor:
    # q: [B, H, n, D]; k, v: [B, KVH, L, D]. Grouped-query SDPA where torch supports it (>= 2.5), else repeated KV.
    try:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    except TypeError:
        group = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                              **kwargs)


def decode_splits(batch: int, context: int) -> dict[str, int]:
    """The split counts timed: the engine's eager and CUDA-graph choices, and the reviewed 2-per-SM heuristic."""
    from glmserve.bench.kernels.decode_bandwidth_model import REVIEWED_CODE
    from glmserve.kernels.triton.split_kv import choose_num_splits
    device = torch.device(DEVICE)
    return {"eager": choose_num_splits(batch, NUM_KV_HEADS, context, device),
            "graph": choose_num_splits(batch, NUM_KV_HEADS, GRAPH_MODEL_LEN, device),
            "2/SM": REVIEWED_CODE.splits(batch, context)}


def _predicted_us(batch: int, context: int, graph: bool) -> float:
    """The bandwidth model's time for this case (an H100, this triton's recorded sm_90 compile)."""
    import triton

    from glmserve.bench.kernels.decode_bandwidth_model import THIS_CODE, predict, recorded_resources
    decode, merge = recorded_resources(triton.__version__)
    return predict(THIS_CODE, decode, merge, batch, context, GRAPH_MODEL_LEN if graph else None).total_us


def bench_decode(batch: int, context: int, peak_gbps: float | None) -> dict:
    from glmserve.kernels.triton.decode_attention import paged_decode_attention

    row = {"batch": batch, "context": context}
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize   # K and V, read once
    replicas = _replicas(kv_bytes)
    if not _fits(3 * replicas * kv_bytes):   # the paged replicas plus the contiguous copies SDPA reads
        return {**row, "skipped": "does not fit in free GPU memory"}
    kv = PagedReplicas(batch, context, replicas, table_width=GRAPH_MODEL_LEN // BLOCK_SIZE)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    query = torch.randn(batch, NUM_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    scale = HEAD_DIM ** -0.5
    splits = decode_splits(batch, context)

    def run(num_splits: int, replica: int, table_width: int | None = None):
        tables = kv.tables[replica] if table_width else kv.tables[replica, :, :context // BLOCK_SIZE]
        return paged_decode_attention(query, kv.k_cache, kv.v_cache, tables, seq_lens, scale, num_splits=num_splits)

    k_contig = [kv.contiguous(kv.k_cache, r) for r in range(replicas)]
    v_contig = [kv.contiguous(kv.v_cache, r) for r in range(replicas)]

    def sdpa(replica: int):
        return _sdpa_gqa(query[:, :, None, :], k_contig[replica], v_contig[replica], scale=scale)[:, :, 0, :]

    expected = sdpa(0).float()
    result = {**row, "kv_bytes": kv_bytes, "replicas": replicas, "splits": splits, "ms": {}, "gbps": {},
              "max_abs_diff": {}, "predicted_us": {"eager": _predicted_us(batch, context, False),
                                                   "graph": _predicted_us(batch, context, True)}}
    for mode, num_splits in splits.items():
        width = GRAPH_MODEL_LEN // BLOCK_SIZE if mode == "graph" else None
        result["max_abs_diff"][mode] = (run(num_splits, 0, width).float() - expected).abs().max().item()
        ms = _time_ms(lambda: [run(num_splits, r, width) for r in range(replicas)], replicas)
        result["ms"][mode] = ms
        result["gbps"][mode] = kv_bytes / ms / 1e6
    sdpa_ms = _time_ms(lambda: [sdpa(r) for r in range(replicas)], replicas)
    result["ms"]["sdpa"], result["gbps"]["sdpa"] = sdpa_ms, kv_bytes / sdpa_ms / 1e6
    result["peak_fraction"] = {m: g / peak_gbps for m, g in result["gbps"].items()} if peak_gbps else None
    del kv, k_contig, v_contig
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return result


def _causal_pairs(new: int, context: int) -> int:
    """(query, key) pairs a chunk of ``new`` tokens at the end of ``context`` tokens attends to."""
    return new * (context - new) + new * (new + 1) // 2


def bench_prefill(name: str, batch: int, new: int, context: int) -> dict:
    from glmserve.kernels.triton.extend_attention import paged_extend_attention

    row = {"case": name, "batch": batch, "new_tokens": new, "context": context}
    group = NUM_HEADS // NUM_KV_HEADS
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE.itemsize
    replicas = _replicas(kv_bytes)
    if not _fits(kv_bytes * (replicas + 2 + group)):   # paged replicas, contiguous copy, KV repeated for SDPA
        return {**row, "skipped": "does not fit in free GPU memory"}
    kv = PagedReplicas(batch, context, replicas)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    query_start_loc = torch.arange(0, (batch + 1) * new, new, dtype=torch.int32, device=DEVICE)
    query = torch.randn(batch * new, NUM_HEADS, HEAD_DIM, device=DEVICE, dtype=DTYPE)
    scale = HEAD_DIM ** -0.5

    def run(replica: int):
        return paged_extend_attention(query, kv.k_cache, kv.v_cache, kv.tables[replica], query_start_loc, seq_lens,
                                      scale, new, max_seq_len=context)

    k, v = kv.contiguous(kv.k_cache, 0), kv.contiguous(kv.v_cache, 0)
    q = query.view(batch, new, NUM_HEADS, HEAD_DIM).transpose(1, 2)                   # [B, H, n, D]
    if new == context:
        def sdpa():
            return _sdpa_gqa(q, k, v, is_causal=True, scale=scale)
    else:
        # A chunk's causal mask is aligned bottom-right (query i sits at position context - new + i).
        mask = torch.ones(new, context, dtype=torch.bool, device=DEVICE).tril(context - new)
        k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

        def sdpa():
            return F.scaled_dot_product_attention(q, k_full, v_full, attn_mask=mask, scale=scale)

    expected = sdpa().transpose(1, 2).reshape(batch * new, NUM_HEADS, HEAD_DIM)
    diff = (run(0).float() - expected.float()).abs().max().item()
    triton_ms = _time_ms(lambda: [run(r) for r in range(replicas)], replicas)
    sdpa_ms = _time_ms(sdpa, 1)
    flops = 4 * NUM_HEADS * HEAD_DIM * batch * _causal_pairs(new, context)   # QK^T and PV, 2 flops a MAC
    del kv, k, v
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return {**row, "flops": flops, "replicas": replicas, "triton_ms": triton_ms,
            "triton_tflops": flops / triton_ms / 1e9, "sdpa_ms": sdpa_ms, "sdpa_tflops": flops / sdpa_ms / 1e9,
            "speedup_vs_sdpa": sdpa_ms / triton_ms, "max_abs_diff": diff}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def decode_line(r: dict) -> str:
    if "skipped" in r:
        return f"decode b={r['batch']} ctx={r['context']}: skipped: {r['skipped']}"
    modes = " ".join(f"{m}(S={r['splits'].get(m, '-')}) {r['ms'][m] * 1e3:.1f}us {r['gbps'][m]:.0f}GB/s"
                     for m in r["ms"])
    pred = r["predicted_us"]
    return (f"decode b={r['batch']} ctx={r['context']}: {modes}; predicted eager {pred['eager']:.1f}us graph "
            f"{pred['graph']:.1f}us; max diff {max(r['max_abs_diff'].values()):.1e}")


def prefill_line(r: dict) -> str:
    if "skipped" in r:
        return f"{r['case']}: skipped: {r['skipped']}"
    return (f"{r['case']}: {r['triton_ms']:.3f} ms {r['triton_tflops']:.1f} TFLOP/s; sdpa {r['sdpa_ms']:.3f} ms "
            f"{r['sdpa_tflops']:.1f} TFLOP/s; x{r['speedup_vs_sdpa']:.2f}; max diff {r['max_abs_diff']:.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glmserve.bench.kernels.triton_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the results as JSON to this path (after every point)")
    parser.add_argument("--peak-gbps", type=float, help="peak memory bandwidth of the GPU (default: from its name)")
    args = parser.parse_args(argv)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("glmserve.bench.kernels.triton_kernels needs a CUDA GPU (the Triton kernels are benchmarked "
              "compiled); none found.", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    peak = args.peak_gbps or detect_peak_gbps(name)
    torch.manual_seed(0)
    result = {"device": name, "peak_gbps": peak, "dtype": str(DTYPE).removeprefix("torch."),
              "timing": "triton.testing.do_bench_cudagraph, KV replicas rotated past L2",
              "shapes": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                         "block_size": BLOCK_SIZE}, "decode": [], "prefill": []}

    def save() -> None:
        if args.out:
            with open(output_path(args.out), "w", encoding="utf-8") as f:
                json.dump(result, f, indent=2)

    print(f"device: {name}  peak: {_fmt(peak, '.0f')} GB/s  dtype: {result['dtype']}", flush=True)
    for batch in DECODE_BATCHES:
        for context in DECODE_CONTEXTS:
            start = time.perf_counter()
            result["decode"].append(bench_decode(batch, context, peak))
            save()
            print(f"{decode_line(result['decode'][-1])} [{time.perf_counter() - start:.1f}s]", flush=True)
    for case in PREFILL_CASES:
        start = time.perf_counter()
        result["prefill"].append(bench_prefill(*case))
        save()
        print(f"{prefill_line(result['prefill'][-1])} [{time.perf_counter() - start:.1f}s]", flush=True)
    if args.out:
        print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
