"""``glmserve-bench startup-heap``: what Python's garbage collector costs an engine, with the start-up heap frozen
and without.

  glmserve-bench startup-heap [--model glm-tiny] [--streams 256] [--max-tokens 128] [--rounds 3] [--out r.json]

Builds the offline engine (torch and the model loaded, as in an engine core), counts the objects the collector
tracks and times one full collection; then runs ``--rounds`` batches of ``--streams`` greedy requests and reports
each batch's median and slowest engine step and its full (generation 2) collections. The same again after
``startup_heap.freeze_startup_heap()``, in the same process.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

from glmserve.bench.common.machine import machine_info
from glmserve.bench.common.command import refuse, report, standalone_main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="glm-tiny", help="a preset (dummy weights) or a checkpoint directory")
    parser.add_argument("--streams", type=int, default=256, help="requests per batch (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per request (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="batches per setting (default: %(default)s)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")


@dataclass
class HeapSetting:
    frozen: bool
    tracked_objects: int                 # what a full collection walks
    full_collection_ms: float
    median_step_ms: list[float] = field(default_factory=list)     # per batch
    slowest_step_ms: list[float] = field(default_factory=list)
    full_collections: list[int] = field(default_factory=list)


@dataclass
class HeapResult:
    settings: dict
    machine: dict
    results: list[HeapSetting] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'heap':<8} {'tracked':>9} {'full GC ms':>11} {'median step ms':>16} {'slowest step ms':>18} "
                 f"{'full GCs':>9}"]
        for r in self.results:
            lines.append(f"{'frozen' if r.frozen else 'as is':<8} {r.tracked_objects:>9} {r.full_collection_ms:>11.1f} "
                         f"{' '.join(f'{v:.1f}' for v in r.median_step_ms):>16} "
                         f"{' '.join(f'{v:.1f}' for v in r.slowest_step_ms):>18} "
                         f"{' '.join(map(str, r.full_collections)):>9}")
        return "\n".join(lines)


def measure(args: argparse.Namespace) -> HeapResult:
    import torch

    from glmserve.engine.core.sampling_params import SamplingParams
    from glmserve.engine.entrypoints.llm import LLM
    from glmserve.engine.runtime.startup_heap import freeze_startup_heap, unfreeze_heap

    result = HeapResult(settings={k: v for k, v in vars(args).items() if k != "func"}, machine=asdict(machine_info()))
    torch.set_num_threads(max(1, torch.get_num_threads() - 1))    # as an engine core leaves one to its frontend
    llm = LLM(model=args.model, max_num_seqs=args.streams, enable_prefix_caching=False,
              num_kv_blocks=args.streams * (-(-(16 + args.max_tokens) // 16)) + 64)
    engine = llm.engine
    step, steps = engine.step, []

    def timed_step():
        start = time.perf_counter()
        outputs = step()
        steps.append(time.perf_counter() - start)
        return outputs
    engine.step = timed_step
    full = []
    gc.callbacks.append(lambda phase, info: full.append(1) if phase == "start" and info["generation"] == 2 else None)
    vocab = engine.info().vocab_size
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    batches = iter(range(10**6))
    try:
        for frozen in (False, True):
            if frozen:
                freeze_startup_heap()
            tracked = len(gc.get_objects())
            start = time.perf_counter()
            gc.collect()
            setting = HeapSetting(frozen, tracked, 1000 * (time.perf_counter() - start))
            for _ in range(args.rounds):
                b = next(batches)
                prompts = [[3 + (b * 7919 + i * 104729 + j * 31) % (vocab - 3) for j in range(16)]
                           for i in range(args.streams)]
                steps.clear()
                full.clear()
                llm.generate(prompt_token_ids=prompts, sampling_params=params)
                setting.median_step_ms.append(1000 * statistics.median(steps))
                setting.slowest_step_ms.append(1000 * max(steps))
                setting.full_collections.append(len(full))
            result.results.append(setting)
    finally:
        gc.callbacks.pop()
        unfreeze_heap()
    return result


def run(args: argparse.Namespace) -> int:
    if min(args.streams, args.max_tokens, args.rounds) < 1:
        return refuse("startup-heap", "--streams, --max-tokens and --rounds must be >= 1")
    return report(measure(args), args.out)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(sys.modules[__name__], "startup-heap", argv)


if __name__ == "__main__":
    raise SystemExit(main())
