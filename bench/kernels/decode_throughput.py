"""End-to-end decode throughput at ChatGLM3-6B shape, against the memory-bandwidth roofline and HF generate.

``glmserve-bench decode [--model chatglm3-6b] [--batch-sizes 1,16,64] [--context 1024]`` (on a GPU).
A decode step must stream every weight once plus each sequence's KV cache, so its lower bound is
``(weight bytes + KV bytes) / peak bandwidth``. The baseline is HF ``GlmForCausalLM.generate`` with a static
batch of the same size on the same weights; its per-step time is the difference of two generate calls divided by
the extra steps. On CUDA every point is measured twice on the same engine: eager, and with decode steps replayed
as CUDA graphs (``--no-cuda-graphs`` skips the second). ``--device cpu --model glm-tiny`` runs the same path as
a smoke test.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from glmserve.bench.kernels.triton_kernels import detect_peak_gbps
from glmserve.bench.common.output import output_path


@dataclass
class DecodePoint:
    batch_size: int
    context: int
    step_ms: float
    tokens_per_s: float
    roofline_ms: float | None             # None without a known peak bandwidth (the CPU smoke run)
    roofline_ratio: float | None          # measured step time / roofline step time (1.0 is the bound)
    hf_step_ms: float | None = None
    speedup_vs_hf: float | None = None
    graph_step_ms: float | None = None        # the same steps replayed as CUDA graphs
    graph_roofline_ratio: float | None = None
    graph_speedup_vs_eager: float | None = None


@dataclass
class DecodeResult:
    model: str
    device: str
    dtype: str
    peak_gbps: float
    weight_bytes: int
    points: list[DecodePoint] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="chatglm3-6b")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens before the timed decode steps")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--peak-gbps", type=float, default=None, help="default: from the device name")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="measure eager steps only (on CUDA both are measured by default)")
    parser.add_argument("--out", default=None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_engine_step(engine, batch_size: int, context: int, steps: int, seed: int = 0) -> float:
    """Milliseconds per decode step with ``batch_size`` sequences of ``context`` tokens (prefill not timed)."""
    from glmserve.engine.core.sampling_params import SamplingParams
    rng = random.Random(seed)
    vocab = engine.tokenizer.vocab_size
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    ids = [f"d{batch_size}-{i}" for i in range(batch_size)]
    for request_id in ids:
        engine.add_request(request_id, [rng.randrange(3, vocab) for _ in range(context)], params)
    requests = [engine.scheduler.requests[i, 0] for i in ids]
    while any(r.num_output_tokens == 0 for r in requests):    # prefill (and the first token) untimed
        engine.step()
    engine.step()                                             # one warm decode step
    _sync(engine.device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    _sync(engine.device)
    elapsed = time.perf_counter() - start
    while engine.has_unfinished_requests():
        engine.step()
    return elapsed / steps * 1e3


@torch.inference_mode()
def measure_hf_step(engine, batch_size: int, context: int, steps: int, seed: int = 0) -> float:
    """HF generate's milliseconds per decode step (static batch), from two runs differing by ``steps`` tokens."""
    from transformers import GlmForCausalLM

    from glmserve.bench.common.hf_glm import hf_config, hf_state_dict
    model = engine.runner.model
    with torch.device(engine.device):
        hf = GlmForCausalLM._from_config(hf_config(engine.model_config), dtype=engine.dtype)
    hf.load_state_dict(hf_state_dict(engine.model_config, model.state_dict()), strict=False)
    hf.eval()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, engine.tokenizer.vocab_size, (batch_size, context), generator=gen).to(engine.device)
    mask = torch.ones_like(ids)

    def run(new_tokens: int) -> float:
        _sync(engine.device)
        start = time.perf_counter()
        hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=False, pad_token_id=0, eos_token_id=None)
        _sync(engine.device)
        return time.perf_counter() - start

    run(2)                                                    # warm-up
    short, long = run(2), run(2 + steps)
    del hf
    if engine.device.type == "cuda":
        torch.cuda.empty_cache()
    return (long - short) / steps * 1e3


def run(args: argparse.Namespace) -> int:
    if args.device == "cuda" and not torch.cuda.is_available():
        print("glmserve-bench decode: error: no CUDA device (use --device cpu for a smoke run)", file=sys.stderr)
        return 2
    from glmserve.engine.entrypoints.llm import LLM
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    blocks = max(sizes) * -(-(args.context + args.decode_steps + 8) // 16)
    graphs = args.cuda_graphs and args.device == "cuda"
    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_num_seqs=max(sizes),
              max_num_batched_tokens=max(2048, args.context), num_kv_blocks=blocks, enable_prefix_caching=False,
              cuda_graphs=graphs)
    engine = llm.engine
    captured = engine.runner.decode_graphs
    engine.runner.decode_graphs = None          # eager first; the captured graphs are put back for their run
    device = engine.device
    peak = args.peak_gbps or ((detect_peak_gbps(torch.cuda.get_device_name(device)) or 0.0) if device.type == "cuda"
                              else 0.0)
    weight_bytes = engine.runner.model.weight_bytes()
    kv_per_token = engine.model_config.kv_bytes_per_token(torch.empty((), dtype=engine.dtype).element_size())
    result = DecodeResult(args.model, str(device), str(engine.dtype).removeprefix("torch."), peak, weight_bytes)
    for batch in sizes:
        step_ms = measure_engine_step(engine, batch, args.context, args.decode_steps)
        mean_context = args.context + 1 + args.decode_steps / 2
        bytes_per_step = weight_bytes + batch * mean_context * kv_per_token
        roofline_ms = round(bytes_per_step / (peak * 1e9) * 1e3, 3) if peak else None
        point = DecodePoint(batch, args.context, round(step_ms, 3), round(batch / step_ms * 1e3, 1),
                            roofline_ms, round(step_ms / roofline_ms, 3) if roofline_ms else None)
        if captured is not None:
            engine.runner.decode_graphs = captured
            replays = captured.replays
            graph_ms = measure_engine_step(engine, batch, args.context, args.decode_steps)
            engine.runner.decode_graphs = None
            if captured.replays - replays < args.decode_steps:
                raise RuntimeError("the CUDA-graph run did not replay its decode steps")
            point.graph_step_ms = round(graph_ms, 3)
            point.graph_roofline_ratio = round(graph_ms / roofline_ms, 3) if roofline_ms else None
            point.graph_speedup_vs_eager = round(step_ms / graph_ms, 3)
        if not args.skip_hf:
            point.hf_step_ms = round(measure_hf_step(engine, batch, args.context, args.decode_steps), 3)
            point.speedup_vs_hf = round(point.hf_step_ms / step_ms, 3)
        result.points.append(point)
        print(f"batch {batch:3d} x ctx {args.context}: {step_ms:8.3f} ms/step, {point.tokens_per_s:9.1f} tok/s, "
              f"roofline {roofline_ms} ms (x{point.roofline_ratio}), HF {point.hf_step_ms} ms/step "
              f"(speedup {point.speedup_vs_hf}); CUDA graphs {point.graph_step_ms} ms/step "
              f"(x{point.graph_roofline_ratio} of roofline)", flush=True)
        if args.out:     # after every point: a run cut short by its time limit still leaves what it measured
            with open(output_path(args.out), "w", encoding="utf-8") as f:
                json.dump(asdict(result), f, indent=2)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glmserve-bench decode", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
