"""Which LoRA adapter slot each token of a forward pass uses: the per-pass input of the LoRA layers.

Built by the model runner once per pass and handed down in ``ForwardBatch.lora``; every LoRA layer of every block
reads the same mapping. Views of one assignment:

- ``token_slots`` [T]: the slot per token (-1: no adapter), what the Triton kernel reads;
- ``runs``: maximal runs of consecutive rows with the same adapter, for the CPU path of large steps, which runs one
  pair of matmuls per run on a slice of the rows (no gather or scatter). The runner orders sequences by adapter
  slot (within decodes and within prefill chunks), so an adapter's rows make one or two runs;
- ``slot_mask``: for the CPU path of small steps (decodes), which multiplies every row by all slots' stacked A at
  once and keeps each row's own slot's columns.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LoraMapping:
    token_slots: torch.Tensor                       # [T] int64: adapter slot of each token, -1 = none
    runs: tuple[tuple[int, int, int], ...]          # (slot, start, end): rows [start, end) all use that slot
    _masks: dict = field(default_factory=dict, compare=False, repr=False)

    def slot_mask(self, num_slots: int, rank: int, dtype: torch.dtype) -> torch.Tensor:
        """[T, num_slots * rank]: 1 in the ``rank`` columns of each token's slot, 0 elsewhere (all 0 without an
        adapter). Built once per pass and shared by every layer."""
        key = (num_slots, rank, dtype)
        mask = self._masks.get(key)
        if mask is None:
            columns = torch.arange(num_slots, device=self.token_slots.device).repeat_interleave(rank)
            mask = self._masks[key] = (self.token_slots[:, None] == columns[None, :]).to(dtype)
        return mask

    @classmethod
    def from_token_slots(cls, token_slots: list[int], device: torch.device) -> "LoraMapping | None":
        """None when no token uses an adapter (the LoRA layers then add nothing)."""
        runs: list[tuple[int, int, int]] = []
        for row, slot in enumerate(token_slots):
            if slot < 0:
                continue
            if runs and runs[-1][0] == slot and runs[-1][2] == row:
                runs[-1] = (slot, runs[-1][1], row + 1)
            else:
                runs.append((slot, row, row + 1))
        if not runs:
            return None
        return cls(token_slots=torch.tensor(token_slots, dtype=torch.int64, device=device), runs=tuple(runs))
