"""``glmserve-bench frontend``: what the gRPC frontend costs on top of the engine.

  glmserve-bench frontend [--model glm-tiny] [--concurrency 1,64,256] [--max-tokens 32] [--prompt-len 16]
                          [--out result.json]

The same streams run twice on one dummy-weights engine: through ``AsyncEngine`` in-process ("engine"), and
through a real gRPC server on loopback with the async client ("grpc"). Each chunk's latency is measured from the
moment the engine step produced it (a step listener stamps it) to the moment the consumer received it, on one
monotonic clock: in the engine mode that is the hand-off to the caller's event loop, in the grpc mode it adds
the servicer, protobuf, HTTP/2 and the client. The difference between the modes is the frontend's cost, per chunk
and in streamed tokens/s. Server, client and engine share one process (and its GIL), as a sidecar client on the
same host would share the CPUs.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from glmserve.engine.runtime.async_engine import AsyncEngine
from glmserve.engine.entrypoints.grpc.client import AsyncGenerationClient
from glmserve.engine.config.engine_config import CacheConfig, EngineConfig, SchedulerConfig
from glmserve.engine.runtime.engine_core import Engine
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.entrypoints.grpc.server import GenerationServer, ServerOptions
from glmserve.engine.entrypoints.grpc.server_thread import ServerThread

from glmserve.bench.common.machine import machine_info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="glm-tiny", help="a preset (dummy weights) or a checkpoint directory")
    parser.add_argument("--concurrency", default="1,64,256", help="comma-separated numbers of concurrent streams")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per stream (eos ignored)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--out", default=None, help="write the result as JSON here")


@dataclass
class ModeResult:
    mode: str                 # "engine" (AsyncEngine in-process) or "grpc"
    concurrency: int          # streams at once
    tokens: int
    wall_s: float
    tokens_per_s: float
    chunk_latency_p50_ms: float
    chunk_latency_p99_ms: float


@dataclass
class FrontendCost:
    concurrency: int
    added_p50_ms: float       # grpc minus engine chunk latency
    added_p99_ms: float
    throughput_ratio: float   # grpc tokens/s over engine tokens/s


@dataclass
class FrontendResult:
    settings: dict
    machine: dict
    results: list[ModeResult] = field(default_factory=list)
    cost: list[FrontendCost] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'mode':<7} {'streams':>7} {'tokens/s':>10} {'p50 ms':>8} {'p99 ms':>8}"]
        for r in self.results:
            lines.append(f"{r.mode:<7} {r.concurrency:>7} {r.tokens_per_s:>10.0f} {r.chunk_latency_p50_ms:>8.2f} "
                         f"{r.chunk_latency_p99_ms:>8.2f}")
        lines.append("")
        lines.append(f"{'streams':>7} {'added p50 ms':>13} {'added p99 ms':>13} {'grpc/engine tok/s':>18}")
        for c in self.cost:
            lines.append(f"{c.concurrency:>7} {c.added_p50_ms:>13.2f} {c.added_p99_ms:>13.2f} "
                         f"{c.throughput_ratio:>18.2f}")
        return "\n".join(lines)


class _EmitTimes:
    """Step listener: when each request's tokens left the engine (engine thread, one append per step's token)."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)

    def __call__(self, engine, outputs) -> None:
        now = time.monotonic()
        for out in outputs:
            if out.outputs[0].token_ids:
                self.times[out.request_id].append(now)


class _Receiver:
    """The consumer side of one stream. A chunk may carry several tokens (a reader that falls behind gets pending
    tokens merged), so tokens are counted one by one and a chunk's latency runs from the engine step that produced
    its last token, whose stamp is ``emitted[tokens - 1]`` (one token per step per stream)."""

    def __init__(self, emitted: list[float], latencies: list[float]):
        self.emitted, self.latencies, self.tokens = emitted, latencies, 0

    def chunk(self, num_tokens: int) -> None:
        if num_tokens:
            self.tokens += num_tokens
            self.latencies.append(time.monotonic() - self.emitted[self.tokens - 1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _prompts(count: int, length: int, vocab: int, salt: int) -> list[list[int]]:
    # Distinct prompts so that neither mode gets prefix-cache hits from the other.
    return [[3 + (salt * 7919 + i * 104729 + j * 31) % (vocab - 3) for j in range(length)] for i in range(count)]


async def _run_streams(concurrency: int, one_stream) -> tuple[int, float]:
    """Run ``concurrency`` streams at once; returns (tokens received, wall seconds)."""
    start = time.monotonic()
    counts = await asyncio.gather(*(one_stream(i) for i in range(concurrency)))
    return sum(counts), time.monotonic() - start


async def _engine_mode(engine: Engine, args, concurrency: int, salt: int) -> ModeResult:
    emits = _EmitTimes()
    async_engine = AsyncEngine(engine)
    async_engine.step_listeners.append(emits)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    prompts = _prompts(concurrency, args.prompt_len, engine.tokenizer.vocab_size, salt)
    latencies: list[float] = []

    async def one_stream(i: int) -> int:
        request_id = f"e{salt}-{i}"
        receiver = _Receiver(emits.times[request_id], latencies)
        async for out in await async_engine.generate(request_id, prompts[i], params):
            receiver.chunk(len(out.outputs[0].token_ids))
        return receiver.tokens

    try:
        tokens, wall = await _run_streams(concurrency, one_stream)
    finally:
        await async_engine.shutdown()
    return _mode_result("engine", concurrency, tokens, wall, latencies)


async def _grpc_mode(server: GenerationServer, engine: Engine, args, concurrency: int, salt: int) -> ModeResult:
    emits = _EmitTimes()
    server.async_engine.step_listeners.append(emits)
    prompts = _prompts(concurrency, args.prompt_len, engine.tokenizer.vocab_size, salt)
    latencies: list[float] = []
    async with AsyncGenerationClient(f"127.0.0.1:{server.port}") as client:
        async def one_stream(i: int) -> int:
            request_id = f"g{salt}-{i}"
            receiver = _Receiver(emits.times[request_id], latencies)
            async for chunk in client.generate(prompt_token_ids=prompts[i],
                                               request_id=request_id, max_tokens=args.max_tokens, temperature=0.0,
                                               ignore_eos=True):
                receiver.chunk(len(chunk.token_ids))
            return receiver.tokens

        try:
            tokens, wall = await _run_streams(concurrency, one_stream)
        finally:
            server.async_engine.step_listeners.remove(emits)
    return _mode_result("grpc", concurrency, tokens, wall, latencies)


def _mode_result(mode, concurrency, tokens, wall, latencies) -> ModeResult:
    return ModeResult(mode, concurrency, tokens, wall, tokens / wall if wall else 0.0,
                      1000 * percentile(latencies, 0.50), 1000 * percentile(latencies, 0.99))


def run(args: argparse.Namespace) -> int:
    result = measure(args)
    print(result.table())
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(asdict(result), f, indent=2)
    return 0


def measure(args: argparse.Namespace) -> FrontendResult:
    levels = [int(c) for c in args.concurrency.split(",")]
    max_tokens_needed = max(levels) * (args.prompt_len + args.max_tokens)
    engine = Engine(EngineConfig(
        model=args.model, attention_backend="torch",
        cache=CacheConfig(num_kv_blocks=-(-max_tokens_needed // 16) + 64, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=max(levels), max_num_batched_tokens=max(2048, max(levels)))))
    result = FrontendResult(settings={k: v for k, v in vars(args).items() if k != "func"},
                            machine=asdict(machine_info()))
    # First calls pay one-time costs (allocator growth, kernel selection) that neither mode should be charged.
    asyncio.run(_engine_mode(engine, args, 1, -1))
    for salt, concurrency in enumerate(levels):
        result.results.append(asyncio.run(_engine_mode(engine, args, concurrency, 2 * salt)))
    # The server gets an event loop of its own, as in a deployment it does not share the client's.
    server = ServerThread(ServerOptions(host="127.0.0.1", port=0, metrics_port=None), lambda: engine)
    try:
        for salt, concurrency in enumerate(levels):
            result.results.append(asyncio.run(_grpc_mode(server.server, engine, args, concurrency, 2 * salt + 1)))
    finally:
        server.close()
    by_key = {(r.mode, r.concurrency): r for r in result.results}
    for concurrency in levels:
        e, g = by_key["engine", concurrency], by_key["grpc", concurrency]
        result.cost.append(FrontendCost(concurrency, g.chunk_latency_p50_ms - e.chunk_latency_p50_ms,
                                        g.chunk_latency_p99_ms - e.chunk_latency_p99_ms,
                                        g.tokens_per_s / e.tokens_per_s if e.tokens_per_s else 0.0))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glmserve-bench frontend", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
