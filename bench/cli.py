"""``glmserve-bench``: one console script, one subcommand per benchmark.

A subcommand is a module with ``add_arguments(parser)`` and ``run(args) -> int``, registered below by module path.
Only the module of the subcommand being run is imported: each pulls in heavy or optional dependencies (torch,
transformers, grpc), and one that is missing or broken must not take the others down.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Sequence


@dataclass(frozen=True)
class Subcommand:
    module: str     # exposes add_arguments(parser) and run(args) -> int
    help: str

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


SUBCOMMANDS: dict[str, Subcommand] = {
    "offline": Subcommand("glmserve.bench.offline.command",
                          "offline throughput: glmserve against HF generate (static batches, one at a time)"),
    "frontend": Subcommand("glmserve.bench.frontend",
                           "the gRPC and HTTP frontends' own cost: streams through each protocol vs in-process"),
    "grpc-pacing": Subcommand("glmserve.bench.grpc_pacing",
                              "a streamed gRPC message's CPU cost, back to back, paced per stream, paced together"),
    "startup-heap": Subcommand("glmserve.bench.startup_heap",
                               "the garbage collector's cost to an engine, start-up heap frozen and not"),
    "serve": Subcommand("glmserve.bench.serve.command", "load-test a running server over gRPC or OpenAI's HTTP API "
                                                        "(latency, throughput, goodput)"),
    "long-context": Subcommand("glmserve.bench.long_context", "a 32768-token prompt on the CPU: time and peak memory"),
    "lora": Subcommand("glmserve.bench.lora",
                       "a batch spread over LoRA adapters against the base model; memory per adapter and prefix"),
    "tp-memory": Subcommand("glmserve.bench.tp_memory", "per-rank weight memory under tensor parallelism (CPU, gloo)"),
    "cpu-linear": Subcommand("glmserve.bench.kernels.cpu_linear",
                             "CPU fp32 linears: F.linear (MKL) against oneDNN, as stored and prepacked"),
    "cpu-attention": Subcommand("glmserve.bench.kernels.cpu_attention",
                                "CPU paged decode attention: the torch reference against the native kernel"),
    "structured": Subcommand("glmserve.bench.structured",
                             "structured outputs: tokens/s all constrained against none, compile time per schema"),
    "decode": Subcommand("glmserve.bench.kernels.decode_throughput",
                         "end-to-end decode throughput against the bandwidth roofline and HF generate (GPU)"),
}


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    """All subcommands are listed; only ``selected`` gets its arguments (and has its module imported)."""
    parser = argparse.ArgumentParser(prog="glmserve-bench", description="glmserve benchmarks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, command in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=command.help, description=command.help)
        if name == selected:
            command.load().add_arguments(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    args = build_parser(selected).parse_args(argv)
    return SUBCOMMANDS[args.command].load().run(args)


if __name__ == "__main__":
    sys.exit(main())
