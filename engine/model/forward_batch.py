"""What one forward pass needs besides token ids and positions, handed to every layer with the call.

Passed explicitly (never a module global or a thread-local set behind the model's back): two engines in one
process may run forward passes at the same time, and a captured CUDA graph records the tensors it reads.
"""
from __future__ import annotations

from dataclasses import dataclass

from glmserve.engine.attention.metadata import AttentionMetadata
from glmserve.engine.model.lora_mapping import LoraMapping


@dataclass
class ForwardBatch:
    attention: AttentionMetadata     # how the pass's T tokens map onto the paged KV cache
    lora: LoraMapping | None = None  # each token's LoRA adapter slot (None: no token uses one)
