"""``glmserve-bench grpc-pacing``: what a streamed gRPC message costs, by when the streams send.

  glmserve-bench grpc-pacing [--streams 64] [--messages 50] [--interval-ms 20] [--out result.json]

No engine: a grpc.aio server (in a process of its own) answers ``Generate`` with ``--messages`` small
``GenerateResponse`` messages per call, to ``--streams`` concurrent calls of a grpc.aio client in this process.
Three ways to pace them:

* ``back-to-back``: every stream writes as fast as it can;
* ``staggered``: every stream writes once per interval, each at its own moment (a phase of its own), as streams
  paced by a timer each would;
* ``aligned``: every stream writes once per interval, all at the same moment, as streams released together by an
  engine step are.

Reported: the CPU time of the server's process and of the client's per message. It is the evidence behind
AsyncEngine releasing held tokens with the next step rather than on per-stream timers.
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
from dataclasses import asdict, dataclass, field

from glmserve.bench.common.machine import machine_info
from glmserve.bench.common.command import refuse, report, standalone_main

PATTERNS = ("back-to-back", "staggered", "aligned")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--streams", type=int, default=64, help="concurrent calls (default: %(default)s)")
    parser.add_argument("--messages", type=int, default=50, help="messages per call (default: %(default)s)")
    parser.add_argument("--interval-ms", type=float, default=20.0,
                        help="a paced stream's time between messages (default: %(default)s)")
    parser.add_argument("--out", default=None, help="write the result as JSON here")


@dataclass
class PatternResult:
    pattern: str
    messages: int
    wall_s: float
    server_cpu_us_per_message: float
    client_cpu_us_per_message: float


@dataclass
class PacingResult:
    settings: dict
    machine: dict
    results: list[PatternResult] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'pattern':<13} {'messages':>9} {'wall s':>7} {'server CPU us/msg':>18} {'client CPU us/msg':>18}"]
        lines += [f"{r.pattern:<13} {r.messages:>9} {r.wall_s:>7.2f} {r.server_cpu_us_per_message:>18.1f} "
                  f"{r.client_cpu_us_per_message:>18.1f}" for r in self.results]
        return "\n".join(lines)


# ---- the server, in a process of its own ----------------------------------------------------------------------------
def _serve(messages: int, interval: float, conn) -> None:
    """Answers "cpu" with its CPU time so far, a pattern name with "ok" once set, None by stopping."""
    import grpc

    from glmserve.proto import generation_pb2 as pb
    from glmserve.proto import generation_pb2_grpc as pb_grpc

    class Servicer(pb_grpc.GenerationServicer):
        pattern = "back-to-back"
        ticks: asyncio.Event | None = None

        async def Generate(self, request, context):
            index = int(request.request_id)
            if self.pattern == "staggered":       # a phase of its own within the interval
                await asyncio.sleep(interval * (index % 97) / 97)
            for _ in range(messages):
                if self.pattern == "staggered":
                    await asyncio.sleep(interval)
                elif self.pattern == "aligned":
                    await self.ticks.wait()
                await context.write(pb.GenerateResponse(request_id=request.request_id, text="ab",
                                                        token_ids=[1, 2, 3, 4]))

    async def main() -> None:
        servicer = Servicer()
        server = grpc.aio.server()
        pb_grpc.add_GenerationServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        conn.send(port)
        loop = asyncio.get_running_loop()

        async def tick() -> None:      # every interval, release every aligned stream at once
            while True:
                await asyncio.sleep(interval)
                servicer.ticks.set()
                servicer.ticks = asyncio.Event()
        servicer.ticks = asyncio.Event()
        ticker = asyncio.ensure_future(tick())
        while (command := await loop.run_in_executor(None, conn.recv)) is not None:
            if command == "cpu":
                conn.send(time.process_time())
            else:
                servicer.pattern = command
                conn.send("ok")
        ticker.cancel()
        await server.stop(None)
    asyncio.run(main())


async def _streams(port: int, count: int) -> tuple[int, float, float]:
    """(messages received, wall seconds, client CPU seconds) of ``count`` concurrent calls."""
    import grpc

    from glmserve.proto import generation_pb2 as pb
    from glmserve.proto import generation_pb2_grpc as pb_grpc
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        await channel.channel_ready()

        async def one(i: int) -> int:
            return sum([1 async for _ in stub.Generate(pb.GenerateRequest(request_id=str(i)))])
        start, cpu = time.monotonic(), time.process_time()
        received = sum(await asyncio.gather(*(one(i) for i in range(count))))
        return received, time.monotonic() - start, time.process_time() - cpu


def measure(args: argparse.Namespace) -> PacingResult:
    result = PacingResult(settings={k: v for k, v in vars(args).items() if k != "func"},
                          machine=asdict(machine_info()))
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(args.messages, args.interval_ms / 1000, child), daemon=True)
    server.start()
    try:
        port = conn.recv()
        asyncio.run(_streams(port, 1))          # connections and first calls: not measured
        for pattern in PATTERNS:
            conn.send(pattern)
            conn.recv()
            conn.send("cpu")
            server_cpu = conn.recv()
            received, wall, client_cpu = asyncio.run(_streams(port, args.streams))
            conn.send("cpu")
            server_cpu = conn.recv() - server_cpu
            result.results.append(PatternResult(pattern, received, wall, 1e6 * server_cpu / received,
                                                1e6 * client_cpu / received))
    finally:
        conn.send(None)
        server.join(30)
    return result


def run(args: argparse.Namespace) -> int:
    if args.streams < 1 or args.messages < 1 or args.interval_ms <= 0:
        return refuse("grpc-pacing", "--streams and --messages must be >= 1 and --interval-ms > 0")
    return report(measure(args), args.out)


def main(argv: list[str] | None = None) -> int:
    return standalone_main(sys.modules[__name__], "grpc-pacing", argv)


if __name__ == "__main__":
    raise SystemExit(main())
