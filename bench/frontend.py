"""``glmserve-bench frontend``: what the gRPC and HTTP frontends cost on top of the engine.

  glmserve-bench frontend [--model glm-tiny] [--concurrency 1,64,256] [--max-tokens 32] [--prompt-len 16]
                          [--modes engine,grpc,http] [--attention-backend auto] [--out result.json]

The same streams run in up to three modes, on engine cores in their own processes (as ``glmserve serve`` runs
them): one for the engine mode, one shared by the two protocols, which take turns on one server as they do in
``glmserve serve``:

* ``engine``: the streams are read in this process straight from ``AsyncEngine``: the engine and the hand-off of its
  deltas, with no protocol at all;
* ``grpc``: a real server in this process (over its own AsyncEngine) serves a gRPC client in a process of its own,
  as real clients are: protobuf, HTTP/2, the servicer and the client's decoding are added;
* ``http``: the same, through the OpenAI-compatible HTTP API: streamed ``/v1/completions`` (token-id prompts, each
  chunk carrying its token ids), read by an aiohttp client in a process of its own: JSON, SSE over HTTP/1.1 (one
  connection per stream), FastAPI/uvicorn and the client's parsing are added.

Each chunk's latency runs from the engine step that produced its last token (the step's timestamp, taken in the
engine core's process) to the moment the reader received it, on the machine's one monotonic clock. The CPU time
of the frontend's process (all its threads) and of the client's, per 1000 streamed tokens, is the cost that
holds still on a busy machine, where throughput and latency move with whatever else runs. The difference
between the modes is a frontend's cost, per chunk and in streamed tokens/s; the grpc/engine and http/engine
throughput ratios are the figures issues 14 and 15 set targets for.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import multiprocessing
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from glmserve.bench.common.machine import machine_info
from glmserve.bench.common.command import refuse, report, standalone_main
from glmserve.engine.config.engine_config import CacheConfig, EngineConfig, SchedulerConfig
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.entrypoints.grpc.client import AsyncGenerationClient
from glmserve.engine.entrypoints.server_options import ServerOptions
from glmserve.engine.entrypoints.server_thread import ServerThread
from glmserve.engine.runtime.async_engine import AsyncEngine
from glmserve.engine.runtime.core_client import ProcessEngineCore
from glmserve.engine.runtime.cpu_placement import bind_this_process, plan_cpu_placement
from glmserve.engine.runtime.startup_heap import freeze_startup_heap, unfreeze_heap
from glmserve.engine.runtime.messages import StepDone


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="glm-tiny", help="a preset (dummy weights) or a checkpoint directory")
    parser.add_argument("--concurrency", default="1,64,256", help="comma-separated numbers of concurrent streams")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per stream (eos ignored)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every level and mode, taking turns; medians are reported")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--min-streams", type=int, default=32,
                        help="streams per run at least: a level below it runs this many, that many at a time "
                             "(one 128-token stream lasts ~0.1 s on glm-tiny: a run of a few streams moves by "
                             "+-15%% with whatever else the machine does) (default: %(default)s)")
    parser.add_argument("--modes", default="engine,grpc,http",
                        help="comma-separated modes to run (engine is the baseline the others are compared with)")
    parser.add_argument("--attention-backend", default="auto", help="of the engine core (default: as serve runs)")
    parser.add_argument("--stream-interval-ms", type=float, default=ServerOptions.stream_interval_ms,
                        help="the streams' message interval, in every mode (default: serve's, %(default)s)")
    parser.add_argument("--max-stream-messages-per-s", type=float,
                        default=ServerOptions.max_stream_messages_per_s,
                        help="the streams' message budget, in every mode (default: serve's, %(default)s)")
    parser.add_argument("--frontend-cpus", type=int, default=ServerOptions.frontend_cpus,
                        help="cores reserved for this process (and its clients), the engine cores bound to the "
                             "others, in every mode, as serve places them (default: serve's, %(default)s)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")


MODES = ("engine", "grpc", "http")


@dataclass
class ModeResult:
    mode: str                 # "engine" (AsyncEngine in this process), "grpc" or "http" (a client process)
    concurrency: int          # streams at once
    tokens: int
    wall_s: float
    tokens_per_s: float
    chunk_latency_p50_ms: float
    chunk_latency_p99_ms: float
    # CPU seconds per 1000 streamed tokens: of this process (the frontend: reading AsyncEngine, and the server with
    # its protocol, all threads), and of the client's process (None in engine mode). Unlike tokens/s, CPU time
    # barely moves when other programs compete for the machine.
    frontend_cpu_ms_per_ktok: float = 0.0
    client_cpu_ms_per_ktok: float | None = None
    tokens_per_message: float = 0.0   # streamed tokens over the messages (chunks) that carried them


@dataclass
class FrontendCost:
    concurrency: int
    added_p50_ms: float       # the frontend's chunk latency minus the engine's
    added_p99_ms: float
    throughput_ratio: float   # median over the rounds of the frontend's tokens/s over the engine's (same round)
    mode: str = "grpc"
    round_ratios: list[float] = field(default_factory=list)


@dataclass
class FrontendResult:
    settings: dict
    machine: dict
    results: list[ModeResult] = field(default_factory=list)
    cost: list[FrontendCost] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'mode':<7} {'streams':>7} {'tokens/s':>10} {'p50 ms':>8} {'p99 ms':>8} "
                 f"{'frontend CPU ms/ktok':>21} {'client CPU ms/ktok':>19} {'tokens/msg':>11}"]
        for r in self.results:
            client = "-" if r.client_cpu_ms_per_ktok is None else f"{r.client_cpu_ms_per_ktok:.0f}"
            lines.append(f"{r.mode:<7} {r.concurrency:>7} {r.tokens_per_s:>10.0f} {r.chunk_latency_p50_ms:>8.2f} "
                         f"{r.chunk_latency_p99_ms:>8.2f} {r.frontend_cpu_ms_per_ktok:>21.0f} {client:>19} "
                         f"{r.tokens_per_message:>11.1f}")
        lines.append("")
        lines.append(f"{'mode':<7} {'streams':>7} {'added p50 ms':>13} {'added p99 ms':>13} {'mode/engine tok/s':>18}")
        for c in self.cost:
            lines.append(f"{c.mode:<7} {c.concurrency:>7} {c.added_p50_ms:>13.2f} {c.added_p99_ms:>13.2f} "
                         f"{c.throughput_ratio:>18.2f}")
        return "\n".join(lines)


# A stream's chunks as its reader saw them: (receive time, tokens in the chunk).
Chunks = list[tuple[float, int]]


class _EmitTimes:
    """Step listener: the engine step time of each request's tokens, in order (one token per step per stream)."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = defaultdict(list)

    def __call__(self, step: StepDone) -> None:
        for out in step.outputs:
            if out.outputs[0].token_ids:
                self.times[out.request_id].append(step.step_time)


def _latencies(emitted: dict[str, list[float]], received: dict[str, Chunks]) -> list[float]:
    """A chunk may carry several tokens (a reader that falls behind gets pending tokens merged): its latency runs
    from the step that produced its last token."""
    latencies = []
    for request_id, chunks in received.items():
        stamps, tokens = emitted[request_id], 0
        for when, count in chunks:
            tokens += count
            latencies.append(when - stamps[tokens - 1])
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def _prompts(count: int, length: int, vocab: int, salt: int) -> list[list[int]]:
    # Distinct prompts, so that no run gets prefix-cache hits from another.
    return [[3 + (salt * 7919 + i * 104729 + j * 31) % (vocab - 3) for j in range(length)] for i in range(count)]


async def _gather_streams(count: int, concurrency: int, one_stream) -> tuple[dict[str, Chunks], float]:
    """``count`` streams, ``concurrency`` at a time (a new one starts as soon as one ends)."""
    slots = asyncio.Semaphore(concurrency)

    async def limited(i: int) -> tuple[str, Chunks]:
        async with slots:
            return await one_stream(i)
    start = time.monotonic()
    streams = await asyncio.gather(*(limited(i) for i in range(count)))
    return dict(streams), time.monotonic() - start


# ---- the engine mode: AsyncEngine's streams read in this process ---------------------------------------------------
async def _engine_streams(engine: AsyncEngine, prompts: list[list[int]], concurrency: int, max_tokens: int,
                          salt: int) -> tuple[dict[str, Chunks], float]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one_stream(i: int) -> tuple[str, Chunks]:
        request_id, chunks = f"e{salt}-{i}", []
        async for out in await engine.generate(request_id, prompts[i], params):
            chunks.append((time.monotonic(), len(out.outputs[0].token_ids)))
        return request_id, chunks
    return await _gather_streams(len(prompts), concurrency, one_stream)


# ---- the grpc and http modes: a client in a process of its own -----------------------------------------------------
async def _grpc_client_streams(client: AsyncGenerationClient, prompts: list[list[int]], concurrency: int,
                               max_tokens: int, salt: int) -> tuple[dict[str, Chunks], float]:
    async def one_stream(i: int) -> tuple[str, Chunks]:
        request_id, chunks = f"g{salt}-{i}", []
        async for chunk in client.generate(prompt_token_ids=prompts[i], request_id=request_id,
                                           max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
            chunks.append((time.monotonic(), len(chunk.token_ids)))
        return request_id, chunks
    return await _gather_streams(len(prompts), concurrency, one_stream)


async def _http_client_streams(session, prompts: list[list[int]], concurrency: int, max_tokens: int,
                               salt: int) -> tuple[dict[str, Chunks], float]:
    """Streamed /v1/completions, one connection per stream at a time (as OpenAI clients do: a pool of kept-alive
    connections), the SSE lines parsed as they come; the server sends each chunk's token ids
    (``return_token_ids``)."""
    async def one_stream(i: int) -> tuple[str, Chunks]:
        request_id, chunks = f"h{salt}-{i}", []
        body = {"prompt": prompts[i], "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "return_token_ids": True}
        async with session.post("completions", json=body, headers={"x-request-id": request_id}) as response:
            response.raise_for_status()
            async for line in response.content:
                if not line.startswith(b"data: "):
                    continue
                payload = line[6:].strip()
                if payload == b"[DONE]":
                    break
                tokens = json.loads(payload)["choices"][0]["token_ids"]
                chunks.append((time.monotonic(), len(tokens)))
        return request_id, chunks
    return await _gather_streams(len(prompts), concurrency, one_stream)


async def _open_client(mode: str, address: str):
    """The client a process keeps for all its jobs, as a real client keeps its channel or connection pool: the
    connections are made once (the warm-up run), not inside a measured run."""
    if mode == "grpc":
        client = AsyncGenerationClient(address)
        await client.health()
        return client, client.close
    import aiohttp
    session = aiohttp.ClientSession(base_url=address.rstrip("/") + "/", connector=aiohttp.TCPConnector(limit=0))
    return session, session.close


def _client_worker(mode: str, address: str, conn) -> None:
    """A client process: runs each job it is sent (prompts, concurrency, max_tokens, salt) on one event loop and
    one client, and sends back what it received, the wall time and its own CPU time."""
    streams = _grpc_client_streams if mode == "grpc" else _http_client_streams
    loop = asyncio.new_event_loop()
    client, close = loop.run_until_complete(_open_client(mode, address))
    freeze_startup_heap()       # its imports' full collections would stall its reading
    while (job := conn.recv()) is not None:
        cpu = time.process_time()
        received, wall = loop.run_until_complete(streams(client, *job))
        conn.send((received, wall, time.process_time() - cpu))
    loop.run_until_complete(close())
    loop.close()
    conn.close()


class _ClientProcess:
    """The mode's client in a process of its own, started once (its imports take seconds) for every level."""

    def __init__(self, mode: str, server: ServerThread):
        address = server.target if mode == "grpc" else server.base_url
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_client_worker, args=(mode, address, child), daemon=True)
        self._process.start()
        child.close()

    def streams(self, prompts: list[list[int]], concurrency: int, max_tokens: int,
                salt: int) -> tuple[dict[str, Chunks], float, float]:
        """(what the client received, its wall time, its CPU time)."""
        self._conn.send((prompts, concurrency, max_tokens, salt))
        return self._conn.recv()

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(30)


def _mode_result(mode: str, concurrency: int, received: dict[str, Chunks], wall: float,
                 emitted: dict[str, list[float]], frontend_cpu_s: float, client_cpu_s: float | None) -> ModeResult:
    tokens = sum(count for chunks in received.values() for _, count in chunks)
    messages = sum(len(chunks) for chunks in received.values())
    latencies = _latencies(emitted, received)
    per_ktok = 1e6 / tokens if tokens else 0.0
    return ModeResult(mode, concurrency, tokens, wall, tokens / wall if wall else 0.0,
                      1000 * percentile(latencies, 0.50), 1000 * percentile(latencies, 0.99),
                      frontend_cpu_s * per_ktok, None if client_cpu_s is None else client_cpu_s * per_ktok,
                      tokens / messages if messages else 0.0)


def _engine_config(args, levels: list[int]) -> EngineConfig:
    max_tokens_needed = max(levels) * (args.prompt_len + args.max_tokens)
    return EngineConfig(model=args.model, attention_backend=args.attention_backend,
                        cache=CacheConfig(num_kv_blocks=-(-max_tokens_needed // 16) + 64, enable_prefix_caching=False),
                        scheduler=SchedulerConfig(max_num_seqs=max(levels),
                                                  max_num_batched_tokens=max(2048, max(levels))))


class SettingsError(ValueError):
    """A flag's value this benchmark cannot run with (the message names the flag)."""


def check_settings(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    """The levels and the modes; raises SettingsError naming the first bad flag."""
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise SettingsError(f"--concurrency: expected comma-separated numbers, got {args.concurrency!r}") from None
    if min(levels) < 1:
        raise SettingsError(f"--concurrency: every level must be >= 1, got {args.concurrency!r}")
    modes = [m.strip() for m in args.modes.split(",")]
    unknown = [m for m in modes if m not in MODES]
    if unknown or "engine" not in modes:
        raise SettingsError(f"--modes: expected engine and any of grpc, http; got {args.modes!r}")
    for flag, value, least in (("--rounds", args.rounds, 1), ("--min-streams", args.min_streams, 1),
                               ("--max-tokens", args.max_tokens, 1), ("--prompt-len", args.prompt_len, 1),
                               ("--stream-interval-ms", args.stream_interval_ms, 0),
                               ("--max-stream-messages-per-s", args.max_stream_messages_per_s, 0),
                               ("--frontend-cpus", args.frontend_cpus, 0)):
        if value < least:
            raise SettingsError(f"{flag} must be >= {least}, got {value}")
    return levels, modes


def measure(args: argparse.Namespace) -> FrontendResult:
    levels, modes = check_settings(args)
    config = _engine_config(args, levels)
    result = FrontendResult(settings={k: v for k, v in vars(args).items() if k != "func"},
                            machine=asdict(machine_info()))
    # Cores as `glmserve serve` places them: the engine cores on theirs, this process on the frontend's, and the
    # client processes it starts with it (they inherit its binding), so a client's CPU is taken from the
    # frontend's share, never from the engine's, as a client on another machine would take nothing.
    placement = plan_cpu_placement(str(config.device), args.frontend_cpus)
    result.settings["cpus"] = {} if placement is None else {"engine": sorted(placement.engine),
                                                           "frontend": sorted(placement.frontend)}
    cores_before = None if placement is None else bind_this_process(placement.frontend)
    try:
        runs = _run_rounds(args, config, levels, modes, None if placement is None else placement.engine)
    finally:
        # measure() may run inside a larger program (the tests): leave it as it was
        unfreeze_heap()
        if cores_before is not None:
            bind_this_process(cores_before)
    return _summarize(result, runs, levels, modes)


def _run_rounds(args: argparse.Namespace, config: EngineConfig, levels: list[int], modes: list[str],
                engine_cpus: frozenset[int] | None) -> dict[tuple[str, int], list[ModeResult]]:
    interval = args.stream_interval_ms / 1000
    protocols = [m for m in MODES[1:] if m in modes]

    # Two engine cores on the same config: one read in this process (the engine mode), one behind the server both
    # protocols share, as `glmserve serve` runs them. An idle engine core sleeps on its pipe, so the modes can take
    # turns within each round: a machine whose speed drifts then shifts every mode alike.
    def start_engine_core() -> ProcessEngineCore:
        return ProcessEngineCore(config, frontend_cpus=args.frontend_cpus, engine_cpus=engine_cpus).wait_ready()

    engine = AsyncEngine(start_engine_core(),
                         stream_interval=interval, max_messages_per_s=args.max_stream_messages_per_s)
    engine_emits = _EmitTimes()
    engine.step_listeners.append(engine_emits)
    server = clients = None
    try:
        if protocols:
            server = ServerThread(ServerOptions(host="127.0.0.1", port=0, http_port=0 if "http" in protocols else None,
                                                metrics_port=None, stream_interval_ms=args.stream_interval_ms,
                                                max_stream_messages_per_s=args.max_stream_messages_per_s),
                                  start_engine_core)
            server_emits = _EmitTimes()
            server.server.async_engine.step_listeners.append(server_emits)
            clients = {mode: _ClientProcess(mode, server) for mode in protocols}
        vocab = engine.info.vocab_size
        salts = itertools.count()
        freeze_startup_heap()           # as `glmserve serve` does once it is ready

        def run_mode(mode: str, concurrency: int) -> ModeResult:
            salt = next(salts)               # distinct prompts for every run: no prefix-cache hits between runs
            prompts = _prompts(max(concurrency, args.min_streams), args.prompt_len, vocab, salt)
            cpu = time.process_time()
            if mode == "engine":
                received, wall = asyncio.run(_engine_streams(engine, prompts, concurrency, args.max_tokens, salt))
                return _mode_result(mode, concurrency, received, wall, engine_emits.times,
                                    time.process_time() - cpu, None)
            received, wall, client_cpu = clients[mode].streams(prompts, concurrency, args.max_tokens, salt)
            return _mode_result(mode, concurrency, received, wall, server_emits.times, time.process_time() - cpu,
                                client_cpu)

        # First calls pay one-time costs (allocator growth, kernel selection) that no mode should be charged.
        for mode in modes:
            run_mode(mode, 1)
        runs: dict[tuple[str, int], list[ModeResult]] = defaultdict(list)
        for _ in range(args.rounds):
            for concurrency in levels:
                for mode in modes:
                    runs[mode, concurrency].append(run_mode(mode, concurrency))
    finally:
        if clients:
            for client in clients.values():
                client.close()
        if server is not None:
            server.close()
        asyncio.run(engine.shutdown())
    return runs


def _summarize(result: FrontendResult, runs: dict[tuple[str, int], list[ModeResult]], levels: list[int],
               modes: list[str]) -> FrontendResult:
    protocols = [m for m in MODES[1:] if m in modes]
    for mode in modes:
        for concurrency in levels:
            result.results.append(_median_run(runs[mode, concurrency]))
    for mode in protocols:
        for concurrency in levels:
            pairs = list(zip(runs["engine", concurrency], runs[mode, concurrency]))
            ratio = statistics.median(f.tokens_per_s / e.tokens_per_s for e, f in pairs if e.tokens_per_s)
            e, f = _median_run(runs["engine", concurrency]), _median_run(runs[mode, concurrency])
            result.cost.append(FrontendCost(concurrency, f.chunk_latency_p50_ms - e.chunk_latency_p50_ms,
                                            f.chunk_latency_p99_ms - e.chunk_latency_p99_ms, ratio, mode,
                                            [round(f.tokens_per_s / e.tokens_per_s, 3) for e, f in pairs]))
    return result


def _median_run(runs: list[ModeResult]) -> ModeResult:
    """The run with the median tokens/s (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r.tokens_per_s)
    return ordered[(len(ordered) - 1) // 2]


def run(args: argparse.Namespace) -> int:
    try:
        check_settings(args)
    except SettingsError as exc:
        return refuse("frontend", str(exc))
    return report(measure(args), args.out)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(sys.modules[__name__], "frontend", argv)


if __name__ == "__main__":
    raise SystemExit(main())
