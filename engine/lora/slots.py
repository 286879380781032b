"""Resident LoRA adapters: ``max_loras`` slots of stacked weights on the model's device, filled least recently used
first.

Every loaded adapter keeps its weights on the host (``LoraAdapter``); a step that needs adapters not resident copies
them into free slots, or into the slots of the least recently used adapters the step does not need. The scheduler
never runs more than ``max_loras`` adapters at once, so a step always finds room.

Stacks per (layer, module): ``lora_a`` [max_loras, max_rank, in] and ``lora_b`` [max_loras, out, max_rank]; an
adapter of a smaller rank is zero-padded (exact: the padding adds zeros). ``lora_b`` is a transposed view of
[max_loras, max_rank, out] storage, so that all slots' B side by side is one [max_loras * max_rank, out] matrix
(the CPU's all-slots path, layers.py).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from glmserve.engine.lora.layers import install_lora_layers
from glmserve.engine.lora.peft_adapter import LORA_MODULES, LoraAdapter, module_shapes
from glmserve.engine.model.glm import GLMForCausalLM


class LoraSlots:
    def __init__(self, model: GLMForCausalLM, max_loras: int, max_rank: int):
        config = model.config
        device, dtype = model.weights_device, model.weights_dtype
        self.max_loras, self.max_rank = max_loras, max_rank
        self.stacks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, list[bool]]] = {}
        for (layer, module), (in_features, out_features) in _all_modules(config):
            self.stacks[(layer, module)] = (
                torch.zeros(max_loras, max_rank, in_features, dtype=dtype, device=device),
                torch.zeros(max_loras, max_rank, out_features, dtype=dtype, device=device).transpose(1, 2),
                [False] * max_loras)
        install_lora_layers(model, self.stacks)
        self.adapters: dict[str, LoraAdapter] = {}          # loaded (host copies)
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self.loads = 0                                       # copies into a slot (tests and metrics read it)

    def device_bytes(self) -> int:
        """Bytes of all slots' stacked weights on the device."""
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in self.stacks.values())

    def slot_bytes(self) -> int:
        return self.device_bytes() // self.max_loras

    def add(self, adapter: LoraAdapter) -> None:
        if adapter.rank > self.max_rank:
            raise ValueError(f"adapter {adapter.name!r} has rank {adapter.rank} > max rank {self.max_rank}")
        self.adapters[adapter.name] = adapter

    def remove(self, name: str) -> None:
        del self.adapters[name]
        slot = self.resident.pop(name, None)
        if slot is not None:
            self._clear(slot)

    def activate(self, names: set[str]) -> dict[str, int]:
        """Make ``names`` resident (at most ``max_loras``) and mark them most recently used; returns their slots."""
        if len(names) > self.max_loras:
            raise ValueError(f"{len(names)} adapters in one step, but only {self.max_loras} slots")
        for name in sorted(names):
            if name in self.resident:
                self.resident.move_to_end(name)
                continue
            taken = set(self.resident.values())
            free = [s for s in range(self.max_loras) if s not in taken]
            if free:
                slot = free[0]
            else:
                victim = next(n for n in self.resident if n not in names)   # least recently used, not needed now
                slot = self.resident.pop(victim)
            self._fill(slot, self.adapters[name])
            self.resident[name] = slot
        return {name: self.resident[name] for name in names}

    def _fill(self, slot: int, adapter: LoraAdapter) -> None:
        self.loads += 1
        r = adapter.rank
        for key, (lora_a, lora_b, populated) in self.stacks.items():
            pair = adapter.weights.get(key)
            lora_a[slot].zero_()
            lora_b[slot].zero_()
            populated[slot] = pair is not None
            if pair is not None:
                lora_a[slot, :r].copy_(pair[0])
                lora_b[slot, :, :r].copy_(pair[1])

    def _clear(self, slot: int) -> None:
        for lora_a, lora_b, populated in self.stacks.values():
            lora_a[slot].zero_()
            lora_b[slot].zero_()
            populated[slot] = False


def _all_modules(config):
    shapes = module_shapes(config)
    for layer in range(config.num_layers):
        for module in LORA_MODULES:
            yield (layer, module), shapes[module]
