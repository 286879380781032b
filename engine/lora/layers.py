"""LoRA layers: the four linears of every block wrapped so that each token adds its own adapter's update.

``install_lora_layers`` replaces ``query_key_value``, ``dense``, ``dense_h_to_4h`` and ``dense_4h_to_h`` of each
block with a ``LoraLinear`` that runs the base linear unchanged and then adds, token by token, the update of the
adapter slot the pass's ``LoraMapping`` gives that token (none for base-model tokens). The model's code is not
touched: it hands the ``ForwardBatch`` to its blocks but not to their linears, so a hook on the model's forward binds
``batch.lora`` to this model's LoRA layers for exactly the duration of that call and clears it afterwards (per model
instance: two engines in one process never see each other's mapping).

The update is the batched gather-matmul of S-LoRA / punica: on the GPU the Triton kernel (``kernels/triton/lora.py``,
one adapter per token in one launch). On the CPU, torch, in one of two ways:
- small steps (decodes): every row times all slots' A stacked ([T, K] @ [K, S*R]), each row's own slot's columns kept
  by a mask, then times all slots' B stacked: three operations whatever the number of adapters, where per-adapter
  matmuls on a few rows each would cost more in per-call overhead than in arithmetic;
- large steps (prefill chunks): one pair of matmuls per run of rows of one adapter, added in place to those rows
  (the runner groups sequences by adapter, so there are about as many runs as adapters present).
"""
from __future__ import annotations

import torch
from torch import nn

from glmserve.engine.model.forward_batch import ForwardBatch
from glmserve.engine.model.glm import GLMForCausalLM
from glmserve.engine.model.lora_mapping import LoraMapping

# The CPU's all-slots path computes S*R columns per row where one slot's R are needed: worth it while a step has few
# rows (decodes) and the slots are few and small; otherwise the per-adapter path.
ALL_SLOTS_MAX_ROWS = 512
ALL_SLOTS_MAX_COLUMNS = 512
# Block submodule that owns each LoRA-able linear.
_OWNER = {"query_key_value": "self_attention", "dense": "self_attention", "dense_h_to_4h": "mlp",
          "dense_4h_to_h": "mlp"}


class LoraLinear(nn.Module):
    """``base(x)`` plus each token's LoRA update. ``lora_a`` [S, R, in] and ``lora_b`` [S, out, R] are the slots'
    stacked weights (shared with ``LoraSlots``, which fills them); ``populated[s]``: slot s adapts this module."""

    def __init__(self, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, populated: list[bool]):
        super().__init__()
        self.base = base
        self.lora_a, self.lora_b, self.populated = lora_a, lora_b, populated
        self.mapping: LoraMapping | None = None     # bound for one forward pass by the model's hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.mapping is not None:
            add_lora(out, x, self.lora_a, self.lora_b, self.mapping, self.populated)
        return out


def add_lora(out: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, mapping: LoraMapping,
             populated: list[bool]) -> None:
    """out [T, N] += each token's adapter update of x [T, K] (in place)."""
    if out.is_cuda:
        from glmserve.kernels.triton.lora import add_lora as add_lora_triton
        add_lora_triton(out, x, lora_a, lora_b, mapping.token_slots)
        return
    runs = [run for run in mapping.runs if populated[run[0]]]
    if not runs:
        return
    num_slots, rank, _ = lora_a.shape
    if x.shape[0] <= ALL_SLOTS_MAX_ROWS and num_slots * rank <= ALL_SLOTS_MAX_COLUMNS:
        # lora_b is a transposed view of contiguous [S, R, N] storage (slots.py): all slots' B^T is [S*R, N].
        shrunk = torch.mm(x, lora_a.view(num_slots * rank, -1).t())             # [T, S*R]
        shrunk.mul_(mapping.slot_mask(num_slots, rank, shrunk.dtype))           # only each row's own slot
        out.addmm_(shrunk, lora_b.transpose(1, 2).reshape(num_slots * rank, -1))
        return
    for slot, start, end in runs:
        out[start:end].addmm_(torch.mm(x[start:end], lora_a[slot].t()), lora_b[slot].t())


Stacks = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, list[bool]]]


def install_lora_layers(model: GLMForCausalLM, stacks: Stacks) -> list[LoraLinear]:
    """Wrap the linears named in ``stacks[(layer, module)] = (lora_a, lora_b, populated)`` and bind each pass's
    ``ForwardBatch.lora`` to them. Returns the LoRA layers."""
    layers: list[LoraLinear] = []
    blocks = model.transformer.encoder.layers
    for (index, module), (lora_a, lora_b, populated) in sorted(stacks.items()):
        owner = getattr(blocks[index], _OWNER[module])
        wrapped = LoraLinear(getattr(owner, module), lora_a, lora_b, populated)
        setattr(owner, module, wrapped)
        layers.append(wrapped)

    def bind(_module, args, kwargs):
        batch = args[2] if len(args) > 2 else kwargs.get("batch")
        mapping = batch.lora if isinstance(batch, ForwardBatch) else None
        for layer in layers:
            layer.mapping = mapping

    def unbind(_module, _args, _kwargs, _output):
        for layer in layers:
            layer.mapping = None

    model.register_forward_pre_hook(bind, with_kwargs=True)
    model.register_forward_hook(unbind, with_kwargs=True, always_call=True)
    return layers
