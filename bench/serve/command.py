"""``glmserve-bench serve``: load-test a running server, like ``vllm bench serve``, over glmserve's gRPC API or
OpenAI's HTTP API (glmserve's, or any other OpenAI-compatible server's).

  glmserve-bench serve --target localhost:50051 --metrics-url http://localhost:9090/metrics \\
      --dataset random --input-len 32:256 --output-len 16:128 --num-prompts 300 --request-rate 2,4,8 \\
      --goodput ttft:500 tpot:50 --result-json out.json --result-csv out.csv --plot out.png
  glmserve-bench serve --backend openai --base-url http://localhost:8000/v1 --metrics-url ... --dataset random ...
  glmserve-bench serve --backend openai-chat --base-url http://localhost:8000/v1 --dataset multiturn ...

Every request asks for an exact number of output tokens (eos and chat stops ignored), so runs are comparable.
Each offered rate of ``--request-rate`` is one run over the same requests; the console shows a table per run
(and a summary line per rate for a sweep). ``--chaos F`` turns a fraction F of the requests into misbehaving
clients (see serve_chaos) and fails the command unless the server is healthy and idle afterwards.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field

from glmserve.bench.serve.arrivals import arrival_offsets, parse_rates
from glmserve.bench.serve.backend import BACKENDS, Backend, BenchError, ServedModel
from glmserve.bench.serve.chaos import ChaosReport, check_idle
from glmserve.bench.serve.chaos_plan import plan_chaos, status_counts
from glmserve.bench.serve.datasets import (SHAREGPT_SAMPLE, BenchPrompt, IntRange, load_sharegpt, multiturn_prompts,
                             random_prompts, sharegpt_prompts)
from glmserve.bench.serve.grpc_backend import GrpcBackend, as_backend
from glmserve.bench.serve.metrics import compute_metrics, parse_slo
from glmserve.bench.serve.report import RunResult, csv_text, result_json, run_table, sweep_table
from glmserve.bench.serve.runner import Planned, run_plan
from glmserve.bench.serve.server_stats import Counters, Peaks, figures, poll_peaks, scrape
from glmserve.bench.common.output import output_path
from glmserve.bench.serve.structured_arg import parse_structured
from glmserve.engine.runtime.startup_heap import freeze_startup_heap, unfreeze_heap

DATASETS = ("random", "sharegpt", "multiturn")
CHAT_DATASETS = ("sharegpt", "multiturn")
API_KEY_ENV = "GLMSERVE_API_KEY"


@dataclass
class BenchConfig:
    target: str | None = None                        # grpc: HOST:PORT
    backend: str = "grpc"
    base_url: str | None = None                      # openai, openai-chat: http://HOST:PORT/v1
    model: str | None = None                         # openai*: the model to ask for (default: the first served)
    vocab_size: int | None = None                    # openai* random: when the server does not tell it
    dataset: str = "random"
    num_prompts: int = 200
    input_len: IntRange = IntRange(32, 256)          # random: prompt tokens
    output_len: IntRange = IntRange(16, 128)         # random, multiturn: tokens to generate
    sharegpt_path: str = str(SHAREGPT_SAMPLE)
    sharegpt_max_output_len: int = 256
    turns: int = 4                                   # multiturn: turns per user (users = num_prompts // turns)
    system_words: int = 150                          # multiturn: the shared system prompt
    turn_words: IntRange = IntRange(8, 32)           # multiturn: each user message
    request_rates: list[float] = field(default_factory=lambda: [math.inf])
    burstiness: float = 1.0
    max_concurrency: int | None = None
    num_warmups: int = 0
    seed: int = 0
    temperature: float = 0.0
    structured: dict | None = None                   # sampling kwargs of --structured (e.g. {"regex": ...})
    slos_ms: dict[str, float] = field(default_factory=dict)
    metrics_url: str | None = None
    chaos: float = 0.0
    settle_s: float = 10.0
    api_key: str | None = None
    progress: bool = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="grpc",
                        help="grpc: glmserve's gRPC API (--target); openai: /v1/completions with token-id prompts "
                             "(the random dataset); openai-chat: /v1/chat/completions (the sharegpt and multiturn "
                             "datasets), both of any OpenAI-compatible server (--base-url) (default: %(default)s)")
    parser.add_argument("--target", default=None, help="grpc: the server's gRPC address, HOST:PORT")
    parser.add_argument("--base-url", default=None, help="openai, openai-chat: the API's base URL, "
                                                          "e.g. http://localhost:8000/v1")
    parser.add_argument("--model", default=None,
                        help="openai, openai-chat: the model to ask for (default: the first the server lists)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="openai random: the vocabulary the random token ids are drawn from, when the server's "
                             "model list does not give it (glmserve's does)")
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"sent as 'authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    parser.add_argument("--metrics-url", default=None,
                        help="the server's Prometheus page (http://HOST:PORT/metrics), read before and after each "
                             "run for preemptions and the prefix-cache hit rate")
    g = parser.add_argument_group("workload")
    g.add_argument("--dataset", choices=DATASETS, default="random")
    g.add_argument("--num-prompts", type=int, default=200, help="requests per run (default: %(default)s)")
    g.add_argument("--input-len", type=IntRange.parse, default=IntRange(32, 256),
                   help="random: prompt tokens, LOW:HIGH or N (default: %(default)s)")
    g.add_argument("--output-len", type=IntRange.parse, default=IntRange(16, 128),
                   help="random, multiturn: tokens to generate, LOW:HIGH or N (default: %(default)s)")
    g.add_argument("--sharegpt-path", default=str(SHAREGPT_SAMPLE),
                   help="sharegpt: a ShareGPT JSON file (default: the bundled sample)")
    g.add_argument("--sharegpt-max-output-len", type=int, default=256,
                   help="sharegpt: cap on the output length taken from the gpt reply (default: %(default)s)")
    g.add_argument("--turns", type=int, default=4,
                   help="multiturn: turns per user; users = num-prompts // turns (default: %(default)s)")
    g.add_argument("--system-words", type=int, default=150,
                   help="multiturn: words of the system prompt all users share (default: %(default)s)")
    g.add_argument("--turn-words", type=IntRange.parse, default=IntRange(8, 32),
                   help="multiturn: words per user message, LOW:HIGH or N (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="(default: greedy)")
    g.add_argument("--structured", type=parse_structured, default=None, metavar="KIND[:VALUE]",
                   help="structured output for every request: json_schema:FILE, grammar:FILE, regex:PATTERN, "
                        "choice:A,B,C or json_object (a reply ends once its grammar is complete; over HTTP sent as "
                        "response_format or vLLM's structured_outputs)")
    g = parser.add_argument_group("load")
    g.add_argument("--request-rate", type=parse_rates, default=[math.inf],
                   help="requests per second: inf (all at once) or a comma-separated sweep such as 2,4,8")
    g.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the gaps between arrivals: 1 Poisson, <1 burstier, >1 steadier")
    g.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: no cap)")
    g.add_argument("--num-warmups", type=int, default=0, help="untimed requests sent first (default: 0)")
    g.add_argument("--seed", type=int, default=0,
                   help="run i of a sweep draws its prompts and arrivals from seed + i, the warm-up from seed + runs")
    g.add_argument("--goodput", nargs="+", type=parse_slo, default=[], metavar="NAME:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:4000; a request counts when it meets all")
    g.add_argument("--chaos", type=float, default=0.0, metavar="FRACTION",
                   help="this fraction of requests cancel mid-stream, miss tight deadlines, send invalid "
                        "parameters or over-long prompts; exit 1 unless the server is healthy and idle after "
                        "and every other request completed")
    g.add_argument("--settle", type=float, default=10.0,
                   help="seconds the server gets to go idle after a chaos run (default: %(default)s)")
    g = parser.add_argument_group("output")
    g.add_argument("--result-json", default=None,
                   help="write the result as JSON (an object; a list of objects for a sweep)")
    g.add_argument("--result-csv", default=None, help="write one CSV row per run")
    g.add_argument("--plot", default=None, metavar="FILE.png", help="plot latency percentiles against load")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        target=args.target, backend=args.backend, base_url=args.base_url, model=args.model,
        vocab_size=args.vocab_size, dataset=args.dataset, num_prompts=args.num_prompts, input_len=args.input_len,
        output_len=args.output_len, sharegpt_path=args.sharegpt_path,
        sharegpt_max_output_len=args.sharegpt_max_output_len, turns=args.turns, system_words=args.system_words,
        turn_words=args.turn_words, request_rates=args.request_rate, burstiness=args.burstiness,
        max_concurrency=args.max_concurrency, num_warmups=args.num_warmups, seed=args.seed,
        temperature=args.temperature, structured=args.structured, slos_ms=dict(args.goodput), metrics_url=args.metrics_url, chaos=args.chaos,
        settle_s=args.settle, api_key=args.api_key, progress=args.progress)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        results = asyncio.run(benchmark(config))
    except (BenchError, ValueError) as exc:
        print(f"glmserve-bench serve: error: {exc}", file=sys.stderr)
        return 1
    for result in results:
        print(run_table(result))
    if len(results) > 1:
        print(sweep_table(results))
    write_outputs(results, args.result_json, args.result_csv, args.plot)
    chaos_failed = [r for r in results if r.chaos is not None and not r.passed]
    return 1 if chaos_failed else 0


def write_outputs(results: list[RunResult], json_path: str | None, csv_path: str | None,
                  plot_path: str | None) -> None:
    if json_path:
        data = [result_json(r) for r in results]
        output_path(json_path).write_text(json.dumps(data[0] if len(data) == 1 else data, indent=2) + "\n",
                                   encoding="utf-8")
    if csv_path:
        output_path(csv_path).write_text(csv_text(results), encoding="utf-8")
    if plot_path:
        from glmserve.bench.serve.plot import plot_latencies
        plot_latencies(results, plot_path)


def _check(config: BenchConfig) -> None:
    for name in ("num_prompts", "turns", "sharegpt_max_output_len"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.max_concurrency is not None and config.max_concurrency < 1:
        raise ValueError(f"max-concurrency must be >= 1, got {config.max_concurrency}")
    if not config.burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {config.burstiness}")
    if not 0 <= config.chaos <= 1:
        raise ValueError(f"chaos must be a fraction in [0, 1], got {config.chaos}")
    if config.backend == "grpc" and not config.target:
        raise ValueError("--backend grpc needs --target HOST:PORT")
    if config.backend != "grpc":
        if not config.base_url:
            raise ValueError(f"--backend {config.backend} needs --base-url (e.g. http://localhost:8000/v1)")
        if config.backend == "openai" and config.dataset in CHAT_DATASETS:
            raise ValueError(f"the {config.dataset} dataset sends chats: use --backend openai-chat (or grpc)")
        if config.backend == "openai-chat" and config.dataset == "random":
            raise ValueError("the random dataset sends token ids: use --backend openai (or grpc)")
        if config.chaos and not config.metrics_url:
            raise ValueError(f"--chaos with --backend {config.backend} needs --metrics-url: the check that the "
                             "server ends idle reads its load there")


def connect(config: BenchConfig) -> Backend:
    if config.backend == "grpc":
        return GrpcBackend.connect(config.target, config.api_key)
    from glmserve.bench.serve.openai_backend import OpenAIBackend   # aiohttp only where it is used
    return OpenAIBackend(config.base_url, chat=config.backend == "openai-chat", api_key=config.api_key,
                         model=config.model, metrics_url=config.metrics_url, vocab_size=config.vocab_size)


# ---- the benchmark ------------------------------------------------------------------------------------------------
async def benchmark(config: BenchConfig) -> list[RunResult]:
    """One run per request rate, each over requests drawn the same way."""
    _check(config)
    backend = connect(config)
    try:
        info = await backend.model_info()
        # Each run draws its own prompts (run i from seed + i, the warm-up from seed + number of runs): resent
        # prompts would be served from the prefix cache the previous run filled, flattering every rate of a
        # sweep after the first.
        rates = config.request_rates
        if config.num_warmups:
            await warm_up(backend, config, await build_prompts(backend, config, info, config.seed + len(rates)))
        results = []
        for i, rate in enumerate(rates):
            prompts = await build_prompts(backend, config, info, config.seed + i)
            # The harness's own full garbage collections (over its imports: startup_heap.py) would count as server latency.
            freeze_startup_heap()
            results.append(await run_once(backend, config, info, prompts, rate, config.seed + i))
        return results
    finally:
        unfreeze_heap()
        await backend.close()


async def build_prompts(backend: Backend, config: BenchConfig, info: ServedModel,
                        seed: int) -> list[BenchPrompt]:
    """``backend``: a backend, or a gRPC client."""
    backend = as_backend(backend)
    if config.dataset == "random":
        if info.vocab_size is None:
            raise BenchError("the random dataset draws token ids from the model's vocabulary, and the server does "
                             "not tell its size: give --vocab-size")
        longest = config.input_len.high + config.output_len.high
        if info.max_model_len is not None and longest > info.max_model_len:
            raise BenchError(f"--input-len {config.input_len} plus --output-len {config.output_len} can reach "
                             f"{longest} tokens, past the model's max_model_len {info.max_model_len}")
        return random_prompts(config.num_prompts, config.input_len, config.output_len, info.vocab_size, seed)
    if config.dataset == "multiturn":
        users = max(1, config.num_prompts // config.turns)
        return multiturn_prompts(users, config.turns, config.system_words, config.turn_words, config.output_len,
                                 seed)
    exchanges = load_sharegpt(config.sharegpt_path)
    # Lengths by the server's own tokenizer: the chat prompt of the human turn, and the gpt reply's tokens.
    prompt_lens = await asyncio.gather(*(backend.count_prompt_tokens([{"role": "user", "content": e.human}])
                                         for e in exchanges))
    gpt_lens = await asyncio.gather(*(backend.count_text_tokens(e.gpt) for e in exchanges))
    max_model_len = info.max_model_len if info.max_model_len is not None else 1 << 30
    return sharegpt_prompts(exchanges, list(prompt_lens), list(gpt_lens), config.num_prompts,
                            config.sharegpt_max_output_len, max_model_len, seed)


async def warm_up(backend: Backend, config: BenchConfig, prompts: list[BenchPrompt]) -> None:
    """Untimed requests, all at once (within the concurrency cap), each on its own (no session history)."""
    plan = [Planned(i, dataclasses.replace(p, session=None), 0.0)
            for i, p in enumerate(prompts[:config.num_warmups])]
    warm = await run_plan(backend, plan, temperature=config.temperature, max_concurrency=config.max_concurrency,
                          structured=config.structured)
    failed = [r for r in warm.records if not r.ok]
    if failed:
        print(f"warning: {len(failed)} of {len(plan)} warm-up requests failed ({failed[0].code}: "
              f"{failed[0].error})", file=sys.stderr)


async def run_once(backend: Backend, config: BenchConfig, info: ServedModel,
                   prompts: list[BenchPrompt], rate: float, seed: int) -> RunResult:
    offsets = arrival_offsets(len(prompts), rate, config.burstiness, seed)
    if config.chaos and (info.max_model_len is None or info.vocab_size is None):
        raise BenchError("--chaos needs the model's max_model_len and vocabulary size, which the server does not tell")
    chaos = plan_chaos(len(prompts), config.chaos, info.vocab_size or 0, info.max_model_len or 0, seed)
    plan = [Planned(i, p, offset, c) for i, (p, offset, c) in enumerate(zip(prompts, offsets, chaos))]
    before = await _scrape(config.metrics_url)
    peaks = Peaks()
    poller = asyncio.create_task(poll_peaks(backend, peaks))
    label = f"{config.dataset} @ {'inf' if math.isinf(rate) else f'{rate:g}'} req/s"
    try:
        run = await run_plan(backend, plan, temperature=config.temperature, max_concurrency=config.max_concurrency,
                             progress=config.progress, label=label, structured=config.structured)
    finally:
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await poller
    chaos_report = None
    if config.chaos:
        outcomes = [(r.chaos, r.code) for r in run.records if r.chaos is not None]
        chaos_report = ChaosReport(status_counts(outcomes), await check_idle(backend, config.settle_s))
    # Read after the chaos check settled, so the end-of-run gauges show what the run left behind.
    after = await _scrape(config.metrics_url)
    return RunResult(
        model=info.model, dataset=config.dataset, num_prompts=sum(c is None for c in chaos), request_rate=rate,
        burstiness=config.burstiness, max_concurrency=config.max_concurrency, slos_ms=config.slos_ms,
        metrics=compute_metrics(run.records, run.duration, config.slos_ms), server=figures(peaks, before, after),
        chaos=chaos_report, backend=backend.name,
        load_source=backend.load_source if backend.name == "grpc" or config.metrics_url else None)


async def _scrape(url: str | None) -> Counters | None:
    if url is None:
        return None
    try:
        return await asyncio.to_thread(scrape, url)
    except (OSError, ValueError) as exc:   # unreachable, or not a Prometheus page
        raise BenchError(f"cannot read the metrics page {url}: {exc}") from None
