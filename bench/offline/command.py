"""``glmserve-bench offline``: output tokens/s of glmserve against HF ``generate`` on one workload, same weights.

  glmserve-bench offline [--model glm-small] [--num-requests 128] [--input-len 16:512] [--output-len 16:256]
                         [--max-num-seqs 64] [--seed 0] [--out result.json] [--skip-hf] [--skip-hf-single]
                         [--hf-single-requests 16] [--dtype float32|bfloat16]

Three systems run the same requests (random-id prompts, fixed output lengths, greedy, eos ignored, fp32 unless
--dtype bfloat16, where the two implementations' roundings differ and greedy outputs may part after a while):
glmserve's ``LLM`` with ``max_num_seqs`` = the batch size; HF ``GlmForCausalLM.generate`` on static left-padded
batches of that size; HF one request at a time. HF gets glmserve's own weights, so greedy outputs must agree.
The one-at-a-time baseline is slow, so its rate is measured on the first ``--hf-single-requests`` requests.
"""
from __future__ import annotations

import argparse
import os

import torch

from glmserve.engine.entrypoints.llm import LLM
from glmserve.engine.core.sampling_params import SamplingParams

from glmserve.bench.offline.forward_timer import ForwardTimer
from glmserve.bench.common.machine import CpuSnapshot, cpu_snapshot, load_average, machine_info, others_cpu_share
from glmserve.bench.offline.report import (EngineOverhead, OfflineResult, SystemResult, compare_outputs, median_ratios_line,
                             write_results)
from glmserve.bench.common.int_range import IntRange
from glmserve.bench.offline.workload import BenchRequest, make_workload

# A few short requests before each timed run: first calls pay one-time costs (oneDNN kernel selection, allocator
# growth) that a long-running server does not.
WARMUP = [BenchRequest(list(range(100, 132)), 4), BenchRequest(list(range(200, 216)), 4)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="glm-small", help="a preset (dummy weights) or a checkpoint directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.model (default: the model's)")
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--input-len", type=IntRange.parse, default=IntRange(16, 512),
                        help="prompt lengths, uniform in LOW:HIGH (default 16:512)")
    parser.add_argument("--output-len", type=IntRange.parse, default=IntRange(16, 256),
                        help="output lengths, uniform in LOW:HIGH (default 16:256)")
    parser.add_argument("--max-num-seqs", type=int, default=64,
                        help="glmserve's running-batch limit and HF's static batch size")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="glmserve's per-step token budget")
    parser.add_argument("--seed", type=int, default=0, help="workload and dummy-weight seed")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    parser.add_argument("--skip-hf", action="store_true", help="run glmserve only")
    parser.add_argument("--skip-hf-single", action="store_true", help="skip the HF one-at-a-time baseline")
    parser.add_argument("--hf-single-requests", type=int, default=16,
                        help="requests the HF one-at-a-time baseline runs (its tokens/s is measured on these)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and KV cache of every system")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the systems in turn this many times and report the median ratios (a shared "
                             "machine's speed drifts between runs minutes apart)")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    llm = LLM(args.model, tokenizer=args.tokenizer, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed)
    requests = make_workload(args.num_requests, args.input_len, args.output_len, llm.tokenizer.vocab_size,
                             args.seed)
    run_glmserve(llm, WARMUP)
    if args.rounds < 1:
        raise SystemExit("glmserve-bench offline: error: --rounds must be >= 1")
    hf_model = None if args.skip_hf else _hf_model(llm, getattr(torch, args.dtype))
    results = []
    for round_index in range(args.rounds):
        llm.reset_prefix_cache()   # a later round must compute its prompts again, not find them cached
        outputs, glmserve, overhead = run_glmserve(llm, requests)
        result = OfflineResult(settings=_settings(args), machine=machine_info(), glmserve=glmserve,
                               overhead=overhead)
        if hf_model is not None:
            run_hf_baselines(hf_model, requests, outputs, args, result)
        if args.rounds > 1:
            print(f"--- round {round_index + 1} of {args.rounds}")
        print(result.summary())
        results.append(result)
    if args.rounds > 1:
        print(median_ratios_line(results))
    if args.out:
        write_results(args.out, results)
    return 0


def run_glmserve(llm: LLM, requests: list[BenchRequest]) -> tuple[list[list[int]], SystemResult, EngineOverhead]:
    params = [SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True) for r in requests]
    preemptions_before = llm.stats().num_preemptions
    with ForwardTimer(llm.engine.runner.model) as times:
        start = cpu_snapshot()
        results = llm.generate(prompt_token_ids=[r.prompt_token_ids for r in requests], sampling_params=params)
        end = cpu_snapshot()
    outputs = [r.outputs[0].token_ids for r in results]
    num_tokens = sum(len(o) for o in outputs)
    seconds = end.wall - start.wall
    system = _system("glmserve (continuous batching)", len(requests), num_tokens, seconds, start, end)
    overhead = EngineOverhead(seconds, times.forward_seconds, times.logits_seconds, num_tokens,
                              times.num_forward_calls, times.num_forward_tokens,
                              llm.stats().num_preemptions - preemptions_before)
    return outputs, system, overhead


def _hf_model(llm: LLM, dtype: torch.dtype):
    """HF's model with a copy of the very weights glmserve runs with, whatever --model loaded."""
    from glmserve.bench.offline.hf_baseline import build_hf_model
    engine = llm.engine
    return build_hf_model(engine.model_config, engine.runner.model.state_dict(), llm.tokenizer.vocab_size, dtype)


def run_hf_baselines(model, requests: list[BenchRequest], outputs: list[list[int]], args: argparse.Namespace,
                     result: OfflineResult) -> None:
    from glmserve.bench.offline.hf_baseline import generate_one_at_a_time, generate_static_batches
    batch = args.max_num_seqs
    generate_static_batches(model, WARMUP, batch)
    start = cpu_snapshot()
    static = generate_static_batches(model, requests, batch)
    result.hf_static = _system(f"HF generate, static batches of {batch}", len(requests), static.num_output_tokens,
                               static.seconds, start, cpu_snapshot())
    result.agreement.append(compare_outputs("HF static batches", outputs, static.outputs))
    if args.skip_hf_single:
        return
    subset = requests[:max(1, args.hf_single_requests)]
    generate_one_at_a_time(model, WARMUP)
    start = cpu_snapshot()
    single = generate_one_at_a_time(model, subset)
    result.hf_single = _system("HF generate, one at a time", len(subset), single.num_output_tokens, single.seconds,
                               start, cpu_snapshot(), subset=len(subset) < len(requests))
    result.agreement.append(compare_outputs("HF one at a time", outputs, single.outputs))


def _system(name: str, num_requests: int, num_tokens: int, seconds: float, start: CpuSnapshot, end: CpuSnapshot,
            subset: bool = False) -> SystemResult:
    return SystemResult(name, num_requests, num_tokens, seconds, others_cpu_share(start, end), load_average(),
                        subset)


def _settings(args: argparse.Namespace) -> dict:
    settings = {k: v for k, v in vars(args).items() if k != "command"}
    settings["input_len"], settings["output_len"] = str(args.input_len), str(args.output_len)
    return settings
