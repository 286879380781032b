"""The CPU paths of the LoRA update (engine/lora/layers.py) against the kernels' torch reference, on the slots'
real layout (B a transposed view): all slots at once, and per run of rows of one adapter."""
from __future__ import annotations

import pytest
import torch

from glmserve.engine.lora import layers
from glmserve.engine.model.lora_mapping import LoraMapping
from glmserve.kernels.reference.lora import add_lora_ref


def _stacks(num_slots=4, rank=8, k=48, n=80, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lora_a = torch.randn(num_slots, rank, k, generator=gen)
    lora_b = torch.randn(num_slots, rank, n, generator=gen).transpose(1, 2)   # [S, N, R] view, as slots.py keeps it
    return lora_a, lora_b


@pytest.mark.parametrize("path", ["all-slots", "per-adapter"])
@pytest.mark.parametrize("token_slots", [
    [0, -1, 2, 2, -1, 1, 0, 3, -1],          # interleaved, with base tokens: many short runs
    [1, 1, 1, 2, 2, 3],                      # grouped by adapter, as the runner lays rows out
    [-1, -1, -1],                            # no adapter at all
])
def test_cpu_paths_match_the_reference(monkeypatch, path, token_slots):
    if path == "per-adapter":
        monkeypatch.setattr(layers, "ALL_SLOTS_MAX_ROWS", 0)
    lora_a, lora_b = _stacks()
    x = torch.randn(len(token_slots), 48, generator=torch.Generator().manual_seed(1))
    out = torch.randn(len(token_slots), 80, generator=torch.Generator().manual_seed(2))
    expected = out.clone()
    add_lora_ref(expected, x, lora_a, lora_b, torch.tensor(token_slots))
    mapping = LoraMapping.from_token_slots(token_slots, torch.device("cpu"))
    if mapping is not None:
        layers.add_lora(out, x, lora_a, lora_b, mapping, [True] * 4)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_unpopulated_slots_add_nothing(monkeypatch):
    monkeypatch.setattr(layers, "ALL_SLOTS_MAX_ROWS", 0)
    lora_a, lora_b = _stacks()
    x, out = torch.randn(4, 48), torch.zeros(4, 80)
    mapping = LoraMapping.from_token_slots([0, 1, 0, 1], torch.device("cpu"))
    layers.add_lora(out, x, lora_a, lora_b, mapping, [True, False, False, False])
    assert out[[1, 3]].abs().max() == 0 and out[[0, 2]].abs().max() > 0
