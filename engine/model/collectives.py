"""What a tensor-parallel model needs from its process group: two collectives. The model declares them here; the
process group of engine/distributed/group.py provides them (and the tests' in-memory stand-in does too)."""
from __future__ import annotations

from typing import Protocol

import torch


class Collectives(Protocol):
    rank: int
    world_size: int

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place."""
        ...

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's ``x`` concatenated along the last dim on rank 0 (None on the other ranks)."""
        ...
