"""``python -m glmserve.bench.tp_memory``: each tensor-parallel rank's weight memory for N = 1, 2, 4.

  python -m glmserve.bench.tp_memory [--model glm-small] [--sizes 1 2 4] [--out result.json]

Each size runs in a fresh process (so one size's freed memory cannot hide in the next one's resident set) that
builds the engine with dummy weights and a tiny KV cache, then reports every rank's parameter bytes, current and
peak resident set, and the resident set its process had before loading anything (torch and glmserve imported):
the part of the resident set above that baseline is the rank's model. Expect parameter bytes of about 1/N of
N = 1's, plus the replicated RMSNorm weights and, when N exceeds the number of KV groups, the replicated groups.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Sequence

from glmserve.engine.entrypoints.llm import LLM
from glmserve.engine.distributed.memory import RankMemory, measure_rank_memory, resident_bytes
from glmserve.bench.common.output import output_path

MIB = 1024 * 1024
# The KV cache is not what this measures: 16 blocks of 16 tokens keep it out of the picture.
NUM_KV_BLOCKS = 16


@dataclass(frozen=True)
class SizeResult:
    tensor_parallel_size: int
    baseline_rss_bytes: int          # rank 0's process after imports, before the engine
    ranks: list[RankMemory]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="glm-small", help="a preset (dummy weights) or a checkpoint directory")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4], help="tensor-parallel sizes to measure")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--one-size", type=int, default=None, help=argparse.SUPPRESS)   # the per-size child


def run(args: argparse.Namespace) -> int:
    if args.one_size is not None:
        print(json.dumps(dataclasses.asdict(measure(args.model, args.one_size, args.dtype))))
        return 0
    results = [measure_in_child(args.model, n, args.dtype) for n in args.sizes]
    print(report(args.model, results))
    if args.out:
        with open(output_path(args.out), "w", encoding="utf-8") as f:
            json.dump({"model": args.model, "dtype": args.dtype,
                       "sizes": [dataclasses.asdict(r) for r in results]}, f, indent=2)
    return 0


def measure(model: str, n: int, dtype: str) -> SizeResult:
    """Build the engine in this process (rank 0) and read every rank's memory."""
    baseline = resident_bytes()
    engine = LLM(model, load_format="dummy", dtype=dtype, tensor_parallel_size=n, num_kv_blocks=NUM_KV_BLOCKS,
                 attention_backend="torch").engine
    try:
        ranks = engine.executor.rank_memory(engine.runner) if n > 1 else [
            measure_rank_memory(0, engine.runner.model, engine.runner.kv_caches)]
    finally:
        engine.shutdown()
    return SizeResult(n, baseline, ranks)


def measure_in_child(model: str, n: int, dtype: str) -> SizeResult:
    out = subprocess.run([sys.executable, "-m", "glmserve.bench.tp_memory", "--model", model, "--dtype", dtype,
                          "--one-size", str(n)], check=True, capture_output=True, text=True)
    raw = json.loads(out.stdout.strip().splitlines()[-1])
    return SizeResult(raw["tensor_parallel_size"], raw["baseline_rss_bytes"],
                      [RankMemory(**r) for r in raw["ranks"]])


def report(model: str, results: list[SizeResult]) -> str:
    one = next((r for r in results if r.tensor_parallel_size == 1), None)
    full = one.ranks[0].parameter_bytes if one else None
    lines = [f"tensor-parallel memory, {model} (dummy weights); MiB per rank",
             f"{'N':>3} {'rank':>4} {'params':>9} {'of N=1':>7} {'RSS':>8} {'RSS-base':>9} {'peak RSS':>9}"]
    for result in results:
        for m in result.ranks:
            share = f"{m.parameter_bytes / full:7.3f}" if full else f"{'-':>7}"
            lines.append(f"{result.tensor_parallel_size:>3} {m.rank:>4} {m.parameter_bytes / MIB:9.1f} {share} "
                         f"{m.rss_bytes / MIB:8.1f} {(m.rss_bytes - result.baseline_rss_bytes) / MIB:9.1f} "
                         f"{m.peak_rss_bytes / MIB:9.1f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glmserve.bench.tp_memory", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
