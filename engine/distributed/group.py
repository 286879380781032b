"""The tensor-parallel process group: how ranks meet, and the three collectives the model and the runner use.

One group per process (torch.distributed's default group): gloo on CPU, NCCL on GPUs. Rank 0 hosts a TCPStore on
a free loopback port (port 0, so no race for the number) and the workers connect to it.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks meet and how long a collective may wait before failing instead of hanging."""

    port: int
    world_size: int
    backend: str            # "gloo" (CPU) | "nccl" (CUDA)
    timeout_s: float

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def create_store(world_size: int, timeout_s: float) -> dist.TCPStore:
    """Rank 0's store, on a port the OS picks; read it back from ``store.port``."""
    return dist.TCPStore(LOOPBACK, 0, world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s))


class TensorParallelGroup:
    """This process's membership of the group. Create it with :meth:`join`; :meth:`leave` undoes it."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size

    @classmethod
    def join(cls, rendezvous: Rendezvous, rank: int, store: dist.Store | None = None) -> "TensorParallelGroup":
        """Blocks until every rank has joined. Rank 0 passes the store it created; workers connect to it."""
        if store is None:
            store = dist.TCPStore(LOOPBACK, rendezvous.port, rendezvous.world_size, is_master=False,
                                  timeout=rendezvous.timeout)
        dist.init_process_group(rendezvous.backend, store=store, rank=rank, world_size=rendezvous.world_size,
                                timeout=rendezvous.timeout)
        return cls(rank, rendezvous.world_size)

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- collectives ---------------------------------------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place (the row-parallel linears' partial outputs)."""
        dist.all_reduce(x)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenate every rank's ``x`` along the last dim, in rank order, on rank 0 (None elsewhere).
        Used for the logits: [N, V/ranks] per rank -> [N, V] on rank 0."""
        x = x.contiguous()
        if self.rank != 0:
            dist.gather(x, None, dst=0)
            return None
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``x`` into every rank's ``x`` (same shape and dtype everywhere), in place."""
        dist.broadcast(x, src=0)
        return x
