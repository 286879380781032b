"""Compile every Triton kernel variant the engine can launch for ChatGLM3-6B for an H100 (sm_90), on any machine.

  python -m glmserve.bench.kernels.triton_compile [--json report.json] [--dtypes bfloat16,float16,float32]
  (run it without TRITON_INTERPRET: the interpreter compiles nothing)

What it does: it drives the Triton attention backend's ``forward`` at ChatGLM3-6B attention shapes (32 heads,
2 KV groups, head_dim 128, block size 16, query/key/value as views of the fused QKV output as glm.py makes them)
with the kernel launches recorded instead of run (triton_launches.py), over
- the start-up warm-up's batches (engine/attention/triton_warmup.py) for the 8K and the 32K model, and
- serving batches: decode at batch 1-256 and contexts 1-32K, extend chunks of 2-2048 tokens over short and long
  contexts, mixed steps, and the CUDA-graph decode steps (the split count fixed from the model length),
with the H100's 132 SMs for the split choice. Each distinct compiled variant (Triton's JIT cache key) is compiled
for sm_90 with the launch's exact signature, specialisation, constexprs, num_warps and num_stages; ptxas reports
registers and spills, the compiled kernel its shared memory. Serving launches whose variant the warm-up did not
compile are listed as ``uncovered``. The table goes to bench/RESULTS.md; tests/test_sm90_compile.py fails on a
compile error, a spill in a bf16/fp16 kernel, shared memory over the H100's 227 KB, or an uncovered variant.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import asdict

import torch

from glmserve.bench.common.output import output_path
from glmserve.bench.kernels.triton_launches import (H100_SHARED_BYTES, H100_SMS, Launch, compile_launch,
                                                    cuda_target_unavailable, launch_key, record_launches)

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 2, 128, 16    # ChatGLM3-6B attention, the engine's block size
MODEL_LENS = (8192, 32768)                                        # chatglm3-6b, chatglm3-6b-32k
DTYPES = ("bfloat16", "float16", "float32")
HALF_DTYPES = ("bfloat16", "float16")                             # the serving dtypes: no spill allowed
MAX_GRAPH_BATCH = 256
EXIT_NO_CUDA_TARGET = 3


@contextlib.contextmanager
def assume_sms(sms: int):
    """Split choices as on a device with ``sms`` SMs (the tensors here live on the CPU)."""
    from glmserve.kernels.triton import split_kv
    real = split_kv.num_sms
    split_kv.num_sms = lambda device: sms
    try:
        yield
    finally:
        split_kv.num_sms = real


def _attention_inputs(num_tokens: int, dtype: torch.dtype):
    """query/key/value views of one fused [T, (H + 2 KVH) * D] QKV output (as glm.py slices it) and small caches
    of the engine's layout (the strides do not depend on the number of blocks)."""
    qkv = torch.empty(num_tokens, (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, dtype=dtype)
    heads = qkv.unflatten(-1, (-1, HEAD_DIM))
    q = heads[:, :NUM_HEADS]
    k = heads[:, NUM_HEADS:NUM_HEADS + NUM_KV_HEADS]
    v = heads[:, NUM_HEADS + NUM_KV_HEADS:]
    k_cache = torch.empty(4, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=dtype)
    return q, k, v, k_cache, torch.empty_like(k_cache)


def _forward(backend, meta, dtype: torch.dtype, label: str) -> list[Launch]:
    q, k, v, k_cache, v_cache = _attention_inputs(int(meta.slot_mapping.shape[0]), dtype)
    with record_launches(execute=False) as launches:
        backend.forward(q, k, v, k_cache, v_cache, meta, HEAD_DIM ** -0.5)
    for launch in launches:
        launch.label = label
    return launches


def _batch(query_lens, seq_lens):
    from glmserve.engine.attention.triton_warmup import WarmupStep, warmup_batch
    return warmup_batch(WarmupStep(tuple(query_lens), tuple(seq_lens)), BLOCK_SIZE, torch.device("cpu")).attention


def _splits(launches: list[Launch]) -> str:
    """The split count of a recorded attention launch (its grid's last axis / KV heads), for labels."""
    for launch in launches:
        if launch.name == "_decode_split_kernel":
            return f"S={launch.grid[2]}"
        if launch.name == "_extend_kernel":
            return f"S={launch.grid[2] // NUM_KV_HEADS}"
    return ""


def warmup_launches(backend, dtype: torch.dtype, max_model_len: int) -> list[Launch]:
    launches = []
    for step in backend.warmup_steps(NUM_HEADS, NUM_KV_HEADS, max_model_len):
        recorded = _forward(backend, _batch(step.query_lens, step.seq_lens), dtype, "")
        label = f"warm-up q={list(step.query_lens)} ctx={list(step.seq_lens)} {_splits(recorded)}"
        for launch in recorded:
            launch.label = label
        launches += recorded
    return launches


def serving_launches(backend, dtype: torch.dtype, max_model_len: int) -> list[Launch]:
    """Eager steps over a grid of batch sizes, chunk sizes and contexts, and the CUDA-graph decode steps."""
    from glmserve.engine.attention.metadata import AttentionMetadata
    from glmserve.engine.worker.cuda_graph import capture_sizes

    launches = []
    contexts = sorted({1, 15, 16, 17, 127, 129, 1000, 1024, 4096, max_model_len})
    for batch in (1, 2, 3, 16, 64, 256):
        for ctx in contexts:
            recorded = _forward(backend, _batch([1] * batch, [ctx] * batch), dtype, "")
            for launch in recorded:
                launch.label = f"decode b={batch} ctx={ctx} {_splits(recorded)}"
            launches += recorded
    for q in (2, 3, 5, 8, 13, 64, 512, 2048):
        for ctx in sorted({q, q + 1, 1000, max_model_len}):
            if ctx > max_model_len:
                continue
            for decodes in (0, 3):
                recorded = _forward(backend, _batch([1] * decodes + [q, 2], [ctx] * decodes + [ctx, 2]), dtype, "")
                for launch in recorded:
                    launch.label = f"extend q={q} ctx={ctx} +{decodes} decodes {_splits(recorded)}"
                launches += recorded
    # CUDA-graph decode: static buffers for MAX_GRAPH_BATCH rows, max_seq_len fixed to the model length
    # (engine/worker/cuda_graph.py DecodeGraphs).
    max_blocks = -(-max_model_len // BLOCK_SIZE)
    i32 = dict(dtype=torch.int32)
    static_seq_lens = torch.ones(MAX_GRAPH_BATCH, **i32)
    static_tables = torch.zeros(MAX_GRAPH_BATCH, max_blocks, **i32)
    static_slots = torch.full((MAX_GRAPH_BATCH,), -1, dtype=torch.int64)
    static_starts = torch.arange(MAX_GRAPH_BATCH + 1, **i32)
    for size in capture_sizes(MAX_GRAPH_BATCH):
        meta = AttentionMetadata(slot_mapping=static_slots[:size], query_start_loc=static_starts[:size + 1],
                                 seq_lens=static_seq_lens[:size], block_tables=static_tables[:size],
                                 num_decodes=size, max_query_len=1, max_seq_len=max_model_len)
        recorded = _forward(backend, meta, dtype, "")
        for launch in recorded:
            launch.label = f"CUDA graph b={size} {_splits(recorded)}"
        launches += recorded
    return launches


def build_report(dtypes=DTYPES, model_lens=MODEL_LENS) -> dict:
    from glmserve.engine.attention.triton_backend import TritonAttentionBackend
    import triton

    backend = TritonAttentionBackend()
    started = time.perf_counter()
    variants: dict[str, dict] = {}        # key -> report row
    first_launch: dict[str, Launch] = {}
    uncovered: list[str] = []
    checked = {"eager": 0, "cuda_graph": 0}     # serving launches whose variant was looked up
    with assume_sms(H100_SMS):
        for dtype_name in dtypes:
            dtype = getattr(torch, dtype_name)
            for model_len in model_lens:
                warm = warmup_launches(backend, dtype, model_len)
                warm_keys = set()
                for launch in warm:
                    key = launch_key(launch)
                    warm_keys.add(key)
                    first_launch.setdefault(key, launch)
                    row = variants.setdefault(key, {"dtype": dtype_name, "labels": []})
                    row["labels"].append(f"{model_len // 1024}K {launch.label}")
                for launch in serving_launches(backend, dtype, model_len):
                    checked["cuda_graph" if launch.label.startswith("CUDA graph") else "eager"] += 1
                    key = launch_key(launch)
                    if key not in warm_keys:
                        uncovered.append(f"{dtype_name} {model_len // 1024}K {launch.name}: {launch.label}")
    rows = []
    for key, launch in first_launch.items():
        compiled = asdict(compile_launch(launch))
        compiled.pop("labels")
        rows.append({**compiled, **variants[key]})
    return {"triton": triton.__version__, "target": "cuda sm_90 (H100), warp size 32", "sms": H100_SMS,
            "shared_limit_bytes": H100_SHARED_BYTES, "model_lens": list(model_lens),
            "shapes": {"num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
                       "block_size": BLOCK_SIZE},
            "variants": rows, "serving_launches_checked": checked, "uncovered": uncovered,
            "seconds": round(time.perf_counter() - started, 1)}


def problems(report: dict) -> list[str]:
    """What fails the check: compile errors, spills in a serving dtype, shared memory over the H100's limit,
    serving variants the warm-up does not compile."""
    found = []
    for row in report["variants"]:
        name = f"{row['kernel']} {row['dtype']} {_variant(row)}"
        if row["error"]:
            found.append(f"{name}: compile failed: {row['error']}")
            continue
        if row["dtype"] in HALF_DTYPES and (row["spill_store_bytes"] or row["spill_load_bytes"]):
            found.append(f"{name}: spills {row['spill_store_bytes']} B stored / {row['spill_load_bytes']} B loaded")
        if row["shared_bytes"] > report["shared_limit_bytes"]:
            found.append(f"{name}: {row['shared_bytes']} B shared memory > {report['shared_limit_bytes']} B")
    found += [f"not compiled by the warm-up: {u}" for u in report["uncovered"]]
    return found


def _variant(row: dict) -> str:
    c = row["constexprs"]
    parts = []
    if "DIRECT" in c:
        parts.append("1 split" if c["DIRECT"] else "split-KV")
    if "BLOCK_T" in c:
        parts.append(f"BLOCK_T={c['BLOCK_T']}")
    return ", ".join(parts) or "-"


def markdown_table(report: dict) -> str:
    lines = ["| kernel | variant | dtype | warps | stages | load buffers | registers | spills (B) | shared (KB) | "
             "compile (s) | launched by (examples) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {"_kv_cache_write_kernel": 0, "_write_kv_cache_kernel": 0, "_decode_split_kernel": 1,
             "_extend_kernel": 2, "_merge_splits_kernel": 3}
    rows = sorted(report["variants"], key=lambda r: (DTYPES.index(r["dtype"]) if r["dtype"] in DTYPES else 9,
                                                     order.get(r["kernel"], 9), _variant(r)))
    for r in rows:
        if r["error"]:
            stats = f"| | | | | failed: {r['error']} |"
        else:
            spills = r["spill_store_bytes"] + r["spill_load_bytes"]
            stats = (f"| {r['load_buffers']} | {r['registers']} | {spills} | {r['shared_bytes'] / 1024:.1f} | "
                     f"{r['compile_s']:.1f} |")
        labels = "; ".join(dict.fromkeys(r["labels"]))
        short = labels if len(labels) < 70 else labels[:67] + "..."
        lines.append(f"| {r['kernel'].lstrip('_')} | {_variant(r)} | {r['dtype']} | {r['num_warps']} | "
                     f"{r['num_stages']} {stats} {short} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", help="write the report as JSON to this path")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated (default {','.join(DTYPES)})")


def run(args: argparse.Namespace) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton_compile: error: TRITON_INTERPRET=1 is set; the interpreter compiles nothing (unset it)",
              file=sys.stderr)
        return 2
    dtypes = [d for d in args.dtypes.split(",") if d]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        print(f"triton_compile: error: --dtypes takes {', '.join(DTYPES)}; got {args.dtypes!r}", file=sys.stderr)
        return 2
    reason = cuda_target_unavailable()
    if reason:
        print(f"triton_compile: cannot target CUDA here: {reason}", file=sys.stderr)
        return EXIT_NO_CUDA_TARGET
    report = build_report(tuple(dtypes))
    print(markdown_table(report))
    found = problems(report)
    print(f"\n{len(report['variants'])} variants compiled for sm_90 with triton {report['triton']} in "
          f"{report['seconds']} s; {len(report['uncovered'])} serving launches outside the warm-up")
    for problem in found:
        print(f"PROBLEM: {problem}")
    if args.json:
        with open(output_path(args.json), "w", encoding="utf-8") as f:
            json.dump({**report, "problems": found}, f, indent=2)
    return 1 if found else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glmserve.bench.kernels.triton_compile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
