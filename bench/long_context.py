"""A 32768-token prompt through the engine on CPU: completes, with bounded memory.

``glmserve-bench long-context [--prompt-len 32768] [--max-tokens 16]`` runs the glm-small-32k preset
(rope_ratio 50) with chunked prefill, and reports wall time, the process's peak RSS and what a full
score matrix would have needed.
"""
from __future__ import annotations

import argparse
import json
import random
import resource
import sys
import time
from dataclasses import asdict, dataclass
from glmserve.bench.common.output import output_path


@dataclass
class LongContextResult:
    model: str
    prompt_tokens: int
    generated_tokens: int
    max_num_batched_tokens: int
    seconds: float
    peak_rss_mib: float
    rss_before_mib: float
    kv_cache_mib: float
    full_score_matrix_mib: float     # what one layer's [heads, n, n] fp32 scores would need without tiling
    finish_reason: str


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="glm-small-32k")
    parser.add_argument("--prompt-len", type=int, default=32768)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--out", default=None, help="write the result as JSON here")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(args: argparse.Namespace) -> int:
    measure(args)
    return 0


def measure(args: argparse.Namespace) -> LongContextResult:
    from glmserve.engine.entrypoints.llm import LLM
    from glmserve.engine.core.sampling_params import SamplingParams
    llm = LLM(args.model, max_num_seqs=1, max_num_batched_tokens=args.max_num_batched_tokens,
              num_kv_blocks=-(-(args.prompt_len + args.max_tokens) // 16))
    config = llm.engine.model_config
    rng = random.Random(0)
    prompt = [rng.randrange(3, llm.tokenizer.vocab_size) for _ in range(args.prompt_len)]
    rss_before = _rss_mib()
    start = time.perf_counter()
    out = llm.generate(prompt_token_ids=[prompt],
                       sampling_params=SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True))
    seconds = time.perf_counter() - start
    kv_bytes = llm.engine.num_blocks * 16 * config.kv_bytes_per_token(4)
    result = LongContextResult(
        model=args.model, prompt_tokens=len(prompt), generated_tokens=len(out[0].outputs[0].token_ids),
        max_num_batched_tokens=args.max_num_batched_tokens, seconds=round(seconds, 2),
        peak_rss_mib=round(_rss_mib(), 1), rss_before_mib=round(rss_before, 1),
        kv_cache_mib=round(kv_bytes / 2 ** 20, 1),
        full_score_matrix_mib=round(config.num_attention_heads * args.prompt_len ** 2 * 4 / 2 ** 20, 1),
        finish_reason=out[0].outputs[0].finish_reason)
    print(json.dumps(asdict(result), indent=2))
    if args.out:
        with open(output_path(args.out), "w", encoding="utf-8") as f:
            json.dump(asdict(result), f, indent=2)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glmserve-bench long-context", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
