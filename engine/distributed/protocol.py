"""Messages between rank 0 and its worker ranks, over one duplex pipe per worker.

Commands (rank 0 -> worker) tell an idle worker what to do next; the step's sizes (a ``StepHeader``) are one of
them, and the step's tensors then follow over the process group. Workers wait for commands on the pipe rather
than inside a collective: an idle server must not trip the collective timeout, and a pipe that closes tells a
worker that rank 0 is gone. Replies (worker -> rank 0) acknowledge the start-up stages or carry a failure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from glmserve.engine.config.engine_config import EngineConfig
from glmserve.engine.distributed.batch_transfer import StepHeader
from glmserve.engine.distributed.group import Rendezvous
from glmserve.engine.distributed.memory import RankMemory


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process starts from (pickled into it by spawn)."""

    rank: int
    rendezvous: Rendezvous
    config: EngineConfig
    num_threads: int        # torch intra-op threads (the ranks of a CPU run share the host's cores)


# ---- commands ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileForward:
    """Run the CUDA memory-profiling forward that rank 0 runs to size the KV cache (its collectives need every
    rank)."""

    num_tokens: int
    block_size: int
    attention_backend: str


@dataclass(frozen=True)
class BuildRunner:
    """Allocate the KV cache and bind the model, with the same ModelRunner arguments as rank 0."""

    runner_args: dict


@dataclass(frozen=True)
class ReportMemory:
    pass


@dataclass(frozen=True)
class Shutdown:
    pass


Command = Union[ProfileForward, BuildRunner, StepHeader, ReportMemory, Shutdown]


# ---- replies -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerJoining:
    """Imports are done; the worker is about to join the process group."""

    rank: int


@dataclass(frozen=True)
class WorkerReady:
    """The last command (loading the shard, building the runner) succeeded."""

    rank: int


@dataclass(frozen=True)
class WorkerFailed:
    rank: int
    error: str              # the worker's traceback


Reply = Union[WorkerJoining, WorkerReady, WorkerFailed, RankMemory]
