"""A worker rank (1..N-1) of a tensor-parallel engine: its own process, its shard of the model, no scheduler.

It loads only its share of the checkpoint, then follows rank 0: each step it receives the flat batch over the
process group and runs the same forward pass (its all-reduces and the logits gather pair with rank 0's). It exits
on ``Shutdown``, when the command pipe closes (rank 0 is gone), or on any error, which it reports first.
"""
from __future__ import annotations

import os
import signal
import sys
import traceback
from multiprocessing.connection import Connection

import torch

from glmserve.engine.model.loader import load_model, resolve_dtype, resolve_model_source
from glmserve.engine.worker.model_runner import ModelRunner
from glmserve.engine.distributed.batch_transfer import StepHeader, unpack_inputs
from glmserve.engine.distributed.group import TensorParallelGroup
from glmserve.engine.model.shard_layout import ShardLayout
from glmserve.engine.distributed.memory import measure_rank_memory
from glmserve.engine.distributed.protocol import (BuildRunner, ProfileForward, ReportMemory, Shutdown, WorkerFailed, WorkerJoining,
                                WorkerReady, WorkerSpec)
from glmserve.engine.worker.profiling import peak_forward_memory


def rank_device(device: str, rank: int) -> torch.device:
    """Rank r uses GPU r; CPU ranks share the host."""
    return torch.device("cuda", rank) if torch.device(device).type == "cuda" else torch.device("cpu")


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Process entry point (spawned by rank 0's WorkerPool)."""
    # Ctrl-C in a terminal reaches every process of the group; rank 0 decides when the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["GLMSERVE_NO_PROGRESS"] = "1"     # one progress bar (rank 0's) is enough
    try:
        Worker(spec, conn).serve()
    except EOFError:
        pass                                    # rank 0 closed the pipe or died: nothing left to serve
    except BaseException:  # noqa: BLE001 - report anything, then exit non-zero
        try:
            conn.send(WorkerFailed(spec.rank, traceback.format_exc()))
        except OSError:
            pass
        raise SystemExit(1) from None
    # Nothing is left to release; skipping the interpreter's teardown of torch saves about a second per rank.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Worker:
    def __init__(self, spec: WorkerSpec, conn: Connection):
        self.rank, self.conn = spec.rank, conn
        config = spec.config
        torch.set_num_threads(spec.num_threads)
        self.device = rank_device(config.device, spec.rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        conn.send(WorkerJoining(spec.rank))
        self.group = TensorParallelGroup.join(spec.rendezvous, spec.rank)
        source = resolve_model_source(config.model, config.load_format, config.tokenizer)
        layout = ShardLayout(source.config, spec.rank, spec.rendezvous.world_size)
        self.model = load_model(source, self.device, resolve_dtype(config.dtype, self.device), config.seed, layout,
                                self.group)
        self.runner: ModelRunner | None = None
        conn.send(WorkerReady(spec.rank))

    def serve(self) -> None:
        while True:
            command = self.conn.recv()
            match command:
                case StepHeader():
                    payload = torch.empty(command.payload_size, dtype=torch.int64, device=self.device)
                    self.runner.run_model(unpack_inputs(command, self.group.broadcast(payload)))
                case ProfileForward():
                    peak_forward_memory(self.model, command.num_tokens, command.block_size, command.attention_backend)
                case BuildRunner():
                    self.runner = ModelRunner(self.model, **command.runner_args)
                    self.conn.send(WorkerReady(self.rank))
                case ReportMemory():
                    self.conn.send(measure_rank_memory(self.rank, self.model, self.runner.kv_caches))
                case Shutdown():
                    self.group.leave()
                    return
                case _:
                    raise TypeError(f"unknown command {command!r}")
