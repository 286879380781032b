"""``python -m glmserve.bench.demo`` (``make demo``): a server, a load test against it, and a clean shutdown.

1. Starts ``glmserve serve --model glm-tiny --port 0 --http-port 0 --metrics-port 0`` (dummy weights) as a child
   process and waits until its health check says SERVING.
2. Runs the serving benchmark in this process: random prompts at a steady Poisson rate the 2-core reference
   machine sustains over gRPC, then a shorter run of the same kind over the OpenAI-compatible HTTP API, then
   multiturn chats that share a system prompt (the prefix cache's case), then a short run in which a quarter of
   the clients misbehave (the server must end healthy, idle and with every KV block free).
3. Sends SIGTERM while a few streams (gRPC and HTTP) are still generating: they must finish, and the server must
   log its drain and exit with code 0.
Each run prints its table; the results go to ``--out`` as JSON. Exits 1 if anything failed, 0 otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import replace

import aiohttp

from glmserve.engine.entrypoints.grpc.client import SERVING, AsyncGenerationClient, GenerationClient

from glmserve.bench.serve.command import BenchConfig, BenchError, benchmark
from glmserve.bench.serve.datasets import IntRange
from glmserve.bench.serve.report import RunResult, result_json, run_table
from glmserve.bench.common.output import output_path

SERVE_COMMAND = [sys.executable, "-m", "glmserve.engine.entrypoints.cli.main", "serve", "--model", "glm-tiny",
                 "--host", "127.0.0.1", "--port", "0", "--http-port", "0", "--metrics-port", "0"]
SERVING_LINE = re.compile(r"glmserve: serving on \S+:(\d+) metrics on (\d+)(?: http on (\d+))?")
DRAIN_LINE = "glmserve: drained"
START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60
LOG_TAIL = 20
DRAIN_STREAMS = 4          # the first half over gRPC, the rest over HTTP
DRAIN_TOKENS = 96


class ServerDied(RuntimeError):
    """The server exited (or never came up); the message ends with its last log lines."""


class ServerProcess:
    """A server child process whose combined stdout/stderr is read on a thread and kept (the tail) for errors."""

    def __init__(self, command: list[str]):
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: deque[str] = deque(maxlen=500)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def tail(self, n: int = LOG_TAIL) -> str:
        return "\n".join(f"  | {line}" for line in list(self.lines)[-n:]) or "  | (no output)"

    def _fail(self, what: str) -> ServerDied:
        return ServerDied(f"{what}; its last log lines:\n{self.tail()}")

    def wait_for_line(self, pattern: re.Pattern, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            found = next((m for m in map(pattern.search, list(self.lines)) if m), None)
            if found:
                return found
            if self.proc.poll() is not None:
                self._reader.join(2)   # let the last lines in before reporting them
                raise self._fail(f"the server exited with code {self.proc.returncode} before it was listening")
            if time.monotonic() > deadline:
                raise self._fail(f"the server printed no {pattern.pattern!r} line within {timeout:g}s")
            time.sleep(0.05)

    def wait_serving(self, target: str, timeout: float) -> None:
        """Poll grpc.health.v1 until SERVING; fail early if the process dies while loading."""
        deadline = time.monotonic() + timeout
        with GenerationClient(target) as client:
            while True:
                if self.proc.poll() is not None:
                    self._reader.join(2)
                    raise self._fail(f"the server exited with code {self.proc.returncode} while loading")
                try:
                    if client.health(timeout=1) == SERVING:
                        return
                except Exception:  # noqa: BLE001 - not answering yet is what we are waiting out
                    pass
                if time.monotonic() > deadline:
                    raise self._fail(f"the server was not SERVING within {timeout:g}s")
                time.sleep(0.1)

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise self._fail(f"the server did not exit within {timeout:g}s") from None
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# ---- the demo's runs ---------------------------------------------------------------------------------------------
def demo_configs(target: str, metrics_url: str, num_prompts: int, rate: float, progress: bool,
                 base_url: str | None = None) -> list[BenchConfig]:
    base = BenchConfig(target=target, metrics_url=metrics_url, progress=progress,
                       slos_ms={"ttft": 250.0, "tpot": 50.0})
    steady = replace(base, dataset="random", num_prompts=num_prompts, input_len=IntRange(32, 256),
                     output_len=IntRange(16, 128), request_rates=[rate], num_warmups=8)
    over_http = []
    if base_url is not None:
        # The same kind of load over the OpenAI-compatible HTTP API (streamed /v1/completions), shorter; its own
        # seed, so that no prompt comes back from the prefix cache the gRPC run filled.
        over_http = [replace(steady, backend="openai", base_url=base_url, num_prompts=max(8, num_prompts // 5),
                             num_warmups=2, seed=11)]
    return [
        # Steady load: well under the ~1000 tokens/s the 2-core machine streams, so latency shows the engine's
        # per-step cost rather than queueing.
        steady,
        *over_http,
        # Users of 4 turns under one system prompt (16 users by default); each user waits for its reply before
        # the next turn.
        replace(base, dataset="multiturn", num_prompts=max(8, num_prompts // 5), turns=4,
                output_len=IntRange(16, 64), request_rates=[2 * rate]),
        # A quarter of the clients misbehave (cancel, tight deadline, invalid parameters, over-long prompt).
        # Its own seed: prompts of the first run (seed 0) or of its warm-up (seed 1) would come back from the
        # prefix cache.
        replace(base, dataset="random", num_prompts=max(8, num_prompts // 4), input_len=IntRange(32, 256),
                output_len=IntRange(16, 64), request_rates=[2 * rate], chaos=0.25, seed=7),
    ]


async def drain_under_load(target: str, base_url: str, server: ServerProcess) -> list[str]:
    """SIGTERM with ``DRAIN_STREAMS`` streams generating (half gRPC, half HTTP): each must still finish with all
    its tokens."""
    async with AsyncGenerationClient(target) as client, aiohttp.ClientSession() as session:
        started = [asyncio.Event() for _ in range(DRAIN_STREAMS)]

        async def grpc_stream(i: int) -> str:
            tokens = 0
            async for chunk in client.generate(prompt_token_ids=[100 + i] * 32, max_tokens=DRAIN_TOKENS,
                                               min_tokens=DRAIN_TOKENS, ignore_eos=True, temperature=0.0):
                tokens += len(chunk.token_ids)
                started[i].set()
                if chunk.finished:
                    return f"{chunk.finish_reason}, {tokens} tokens"
            return f"ended without a finish reason after {tokens} tokens"

        async def http_stream(i: int) -> str:
            tokens, finish = 0, None
            body = {"prompt": [100 + i] * 32, "max_tokens": DRAIN_TOKENS, "min_tokens": DRAIN_TOKENS,
                    "ignore_eos": True, "temperature": 0.0, "stream": True, "return_token_ids": True}
            async with session.post(f"{base_url}/completions", json=body) as response:
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        choice = json.loads(line[6:])["choices"][0]
                        tokens += len(choice["token_ids"])
                        finish = choice["finish_reason"] or finish
                        started[i].set()
            return f"{finish}, {tokens} tokens" if finish else f"ended without a finish reason after {tokens} tokens"

        tasks = [asyncio.create_task(grpc_stream(i) if i < DRAIN_STREAMS // 2 else http_stream(i))
                 for i in range(DRAIN_STREAMS)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
        server.sigterm()
        return await asyncio.gather(*tasks, return_exceptions=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glmserve.bench.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--num-prompts", type=int, default=300,
                        help="requests of the steady-rate run; the multiturn and chaos runs scale with it")
    parser.add_argument("--rate", type=float, default=6.0, help="requests/s of the steady-rate run")
    parser.add_argument("--out", default="results/demo.json", help="where to write the runs' JSON results")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bars (the default when stderr is not a terminal, e.g. in CI logs)")
    args = parser.parse_args(argv)
    args.progress = args.progress and sys.stderr.isatty()

    t0 = time.perf_counter()
    failures: list[str] = []
    print(f"$ {' '.join(['glmserve'] + SERVE_COMMAND[3:])}", flush=True)
    server = ServerProcess(SERVE_COMMAND)
    try:
        match = server.wait_for_line(SERVING_LINE, START_TIMEOUT_S)
        target, metrics_url = f"127.0.0.1:{match.group(1)}", f"http://127.0.0.1:{match.group(2)}/metrics"
        base_url = f"http://127.0.0.1:{match.group(3)}/v1"
        server.wait_serving(target, START_TIMEOUT_S)
        print(f"server SERVING on {target}, HTTP {base_url} (metrics {metrics_url}) after "
              f"{time.perf_counter() - t0:.1f}s\n", flush=True)

        results: list[RunResult] = []
        for config in demo_configs(target, metrics_url, args.num_prompts, args.rate, args.progress, base_url):
            (result,) = asyncio.run(benchmark(config))
            results.append(result)
            print(run_table(result) + "\n", flush=True)
            if not result.passed:
                failures.append(f"{result.dataset} run ({result.backend}): {result.metrics.completed} of {result.num_prompts} "
                                f"completed, errors {result.metrics.errors}"
                                + ("" if result.chaos is None else ", chaos check "
                                   + ("OK" if result.chaos.health and result.chaos.health.ok else "FAILED")))
        output_path(args.out).write_text(json.dumps([result_json(r) for r in results], indent=2) + "\n", encoding="utf-8")

        print(f"SIGTERM with {DRAIN_STREAMS} streams of {DRAIN_TOKENS} tokens in flight ...", flush=True)
        outcomes = asyncio.run(drain_under_load(target, base_url, server))
        for i, outcome in enumerate(outcomes):
            print(f"  stream {i} ({'grpc' if i < DRAIN_STREAMS // 2 else 'http'}): {outcome}")
            if not isinstance(outcome, str) or not outcome.startswith(f"length, {DRAIN_TOKENS} tokens"):
                failures.append(f"stream {i} did not finish during the drain: {outcome}")
        code = server.wait_exit(STOP_TIMEOUT_S)
        drained = next((line for line in server.lines if line.startswith(DRAIN_LINE)), None)
        print(f"server exited with code {code}: {drained or 'no drain line'}")
        if code != 0 or drained is None:
            failures.append(f"the server did not drain cleanly (exit code {code}):\n{server.tail()}")
    except (ServerDied, BenchError, TimeoutError, OSError, aiohttp.ClientError) as exc:
        failures.append(str(exc))
    finally:
        server.kill()

    elapsed = time.perf_counter() - t0
    if failures:
        print(f"\ndemo FAILED after {elapsed:.0f}s:\n- " + "\n- ".join(failures), file=sys.stderr)
        return 1
    print(f"\ndemo OK in {elapsed:.0f}s (results in {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
