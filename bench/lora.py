"""Serving many fine-tunes at once on the CPU: a batch spread over LoRA adapters against the same batch on the base
model, and the memory each fine-tune costs.

``glmserve-bench lora [--model glm-small] [--num-requests 64] [--num-adapters 8] [--rank 16]`` writes seeded random
adapters in PEFT's format (and one P-tuning v2 checkpoint) to a temporary folder, loads them into one offline engine
and runs the same greedy workload (fixed prompt and output lengths, ``ignore_eos``) twice per round: every request on
the base model, then request i on adapter i mod N, all in one batch. Rounds alternate so drift on a busy machine hits
both sides alike; the median round of each is reported. Prefix caching is off: every round computes every prompt.
Besides wall time, each round's process CPU time (all threads) is reported: on a machine shared with other work the
CPU seconds a round costs vary far less than its wall time.

Memory: a loaded LoRA keeps its weights on the host (``host_bytes``) and, when resident, fills one slot of the
device-side stacks (``slot_bytes``, sized by ``--max-lora-rank`` = ``--rank``); a P-tuning prefix pins
``ceil(pre_seq_len / block_size)`` KV blocks. The same figures are computed for ChatGLM3-6B's shapes in bf16.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from glmserve.bench.common.output import write_json

ALL_MODULES = "query_key_value,dense,dense_h_to_4h,dense_4h_to_h"


@dataclass
class LoraBenchResult:
    model: str
    num_requests: int
    num_adapters: int
    rank: int
    targets: list[str]
    input_len: int
    output_len: int
    rounds: int
    base_tokens_per_s: float            # output tokens / s, median round
    lora_tokens_per_s: float
    loss_pct: float                     # (base - lora) / base
    base_tokens_per_cpu_s: float = 0.0  # output tokens per process CPU second, median round
    lora_tokens_per_cpu_s: float = 0.0
    cpu_loss_pct: float = 0.0
    base_round_s: list[float] = field(default_factory=list)
    lora_round_s: list[float] = field(default_factory=list)
    base_round_cpu_s: list[float] = field(default_factory=list)
    lora_round_cpu_s: list[float] = field(default_factory=list)
    adapter_host_bytes: int = 0         # one loaded adapter's weights on the host
    adapter_slot_bytes: int = 0         # one resident slot (device stacks, all four modules at --rank)
    ptuning_pre_seq_len: int = 0
    ptuning_kv_bytes: int = 0           # KV blocks pinned by one P-tuning prefix
    chatglm3_6b_bf16: dict = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="glm-small", help="a preset or checkpoint directory")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--num-adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default=ALL_MODULES, help="comma-separated LoRA target modules")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pre-seq-len", type=int, default=128, help="the P-tuning prefix measured for memory")
    parser.add_argument("--out", default=None, help="write the result as JSON here")


def run(args: argparse.Namespace) -> int:
    for name in ("num_requests", "num_adapters", "rank", "input_len", "output_len", "rounds", "pre_seq_len"):
        if getattr(args, name) < 1:
            print(f"glmserve-bench lora: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    measure(args)
    return 0


def measure(args: argparse.Namespace) -> LoraBenchResult:
    from glmserve.engine.core.sampling_params import SamplingParams
    from glmserve.engine.entrypoints.llm import LLM
    from glmserve.engine.lora.adapter_writer import write_lora_adapter, write_ptuning_checkpoint

    targets = tuple(t for t in args.targets.split(",") if t)
    llm = LLM(args.model, max_num_seqs=args.num_requests, enable_prefix_caching=False,
              max_num_batched_tokens=max(2048, args.num_requests * args.input_len // 4),
              max_loras=args.num_adapters, max_lora_rank=args.rank)
    config = llm.engine.model_config
    with tempfile.TemporaryDirectory(prefix="glmserve-lora-bench-") as tmp:
        names = [f"lora-{i}" for i in range(args.num_adapters)]
        infos = [llm.load_adapter(name, str(write_lora_adapter(Path(tmp) / name, config, rank=args.rank,
                                                               alpha=2.0 * args.rank, targets=targets, seed=i,
                                                               std=0.02)))
                 for i, name in enumerate(names)]
        prefix = llm.load_adapter("ptuning", str(write_ptuning_checkpoint(Path(tmp) / "ptuning", config,
                                                                          pre_seq_len=args.pre_seq_len)))
    rng = random.Random(0)
    prompts = [[rng.randrange(3, llm.tokenizer.vocab_size) for _ in range(args.input_len)]
               for _ in range(args.num_requests)]
    params = SamplingParams(max_tokens=args.output_len, min_tokens=args.output_len, temperature=0.0,
                            ignore_eos=True)
    spread = [names[i % len(names)] for i in range(args.num_requests)]

    def timed(adapters) -> tuple[float, float]:
        start, start_cpu = time.perf_counter(), time.process_time()
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, adapter=adapters)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
        return seconds, cpu_seconds

    timed(None)                                   # warm-up: first-use costs (oneDNN, allocations, slot fills)
    timed(spread)
    base, lora = [], []
    for _ in range(args.rounds):
        base.append(timed(None))
        lora.append(timed(spread))
    base_s, base_cpu = [b[0] for b in base], [b[1] for b in base]
    lora_s, lora_cpu = [r[0] for r in lora], [r[1] for r in lora]
    tokens = args.num_requests * args.output_len
    base_tps, lora_tps = tokens / statistics.median(base_s), tokens / statistics.median(lora_s)
    base_cpu_tps, lora_cpu_tps = tokens / statistics.median(base_cpu), tokens / statistics.median(lora_cpu)
    result = LoraBenchResult(
        model=args.model, num_requests=args.num_requests, num_adapters=args.num_adapters, rank=args.rank,
        targets=list(targets), input_len=args.input_len, output_len=args.output_len, rounds=args.rounds,
        base_tokens_per_s=round(base_tps, 1), lora_tokens_per_s=round(lora_tps, 1),
        loss_pct=round(100.0 * (base_tps - lora_tps) / base_tps, 1),
        base_tokens_per_cpu_s=round(base_cpu_tps, 1), lora_tokens_per_cpu_s=round(lora_cpu_tps, 1),
        cpu_loss_pct=round(100.0 * (base_cpu_tps - lora_cpu_tps) / base_cpu_tps, 1),
        base_round_s=[round(s, 3) for s in base_s], lora_round_s=[round(s, 3) for s in lora_s],
        base_round_cpu_s=[round(s, 3) for s in base_cpu], lora_round_cpu_s=[round(s, 3) for s in lora_cpu],
        adapter_host_bytes=infos[0].host_bytes, adapter_slot_bytes=llm.engine.runner.lora_slots.slot_bytes(),
        ptuning_pre_seq_len=args.pre_seq_len, ptuning_kv_bytes=prefix.kv_bytes,
        chatglm3_6b_bf16=chatglm3_6b_memory(args.rank, targets, args.pre_seq_len))
    print(format_result(result))
    if args.out:
        write_json(args.out, asdict(result))
    return result


def chatglm3_6b_memory(rank: int, targets: tuple[str, ...], pre_seq_len: int, block_size: int = 16) -> dict:
    """The same figures for ChatGLM3-6B's shapes in bf16 (2 bytes), computed from the shapes."""
    from glmserve.engine.config.model_config import MODEL_PRESETS
    from glmserve.engine.lora.peft_adapter import LORA_MODULES, module_shapes
    config = MODEL_PRESETS["chatglm3-6b"]
    shapes = module_shapes(config)
    per_layer = sum(rank * (shapes[m][0] + shapes[m][1]) for m in targets)
    slot_per_layer = sum(rank * (shapes[m][0] + shapes[m][1]) for m in LORA_MODULES)
    blocks = -(-pre_seq_len // block_size)
    return {"adapter_bytes": per_layer * config.num_layers * 2, "slot_bytes": slot_per_layer * config.num_layers * 2,
            "ptuning_kv_bytes": blocks * block_size * config.kv_bytes_per_token(2)}


def format_result(r: LoraBenchResult) -> str:
    mib = 2 ** 20
    six = r.chatglm3_6b_bf16
    rows = [
        f"{r.num_requests} requests x ({r.input_len} in, {r.output_len} out), {r.model}, {r.rounds} rounds "
        f"(median)",
        f"                                  output tokens/s   per CPU second",
        f"  base model                      {r.base_tokens_per_s:15.1f} {r.base_tokens_per_cpu_s:16.1f}",
        f"  {r.num_adapters} LoRA adapters (r={r.rank}, {len(r.targets)} modules) {r.lora_tokens_per_s:13.1f} "
        f"{r.lora_tokens_per_cpu_s:16.1f}",
        f"  loss                            {r.loss_pct:14.1f}% {r.cpu_loss_pct:15.1f}%",
        f"  rounds, wall s: base {r.base_round_s}  lora {r.lora_round_s}",
        f"  rounds, CPU s:  base {r.base_round_cpu_s}  lora {r.lora_round_cpu_s}",
        f"memory per LoRA adapter: {r.adapter_host_bytes / mib:.2f} MiB host, one slot {r.adapter_slot_bytes / mib:.2f} "
        f"MiB (ChatGLM3-6B bf16: {six['adapter_bytes'] / mib:.1f} MiB, slot {six['slot_bytes'] / mib:.1f} MiB)",
        f"memory per P-tuning prefix (P={r.ptuning_pre_seq_len}): {r.ptuning_kv_bytes / mib:.2f} MiB of KV blocks "
        f"(ChatGLM3-6B bf16: {six['ptuning_kv_bytes'] / mib:.1f} MiB)",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glmserve-bench lora", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
