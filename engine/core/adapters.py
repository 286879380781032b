"""What the scheduler and the block manager know about a request's fine-tune (pure Python).

A fine-tune is either a LoRA adapter (PEFT format) or a P-tuning v2 prefix; requests name it the same way. The
engine resolves the name to an ``AdapterBinding`` when the request arrives:

- ``cache_salt`` starts the prefix-cache hash chain of the request's blocks, so KV computed under one fine-tune (or
  under the base model) is never reused by another. It is unique per load: an adapter unloaded and loaded again
  under the same name never meets its predecessor's cached blocks.
- ``kv_prefix`` (P-tuning only) is the read-only run of KV blocks that starts every sequence of that fine-tune.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class AdapterKind(str, enum.Enum):
    LORA = "lora"
    PTUNING = "ptuning"


@dataclass(frozen=True)
class KVPrefix:
    """P learned K/V slots before the prompt, in ``ceil(P / block_size)`` blocks pinned while the fine-tune is loaded.

    Full blocks are shared by reference by every sequence of the fine-tune. When P is not a multiple of the block
    size, the last pinned block is only a source: its first ``P % block_size`` slots are copied into each sequence's
    own first block, whose remaining slots hold the sequence's first tokens.
    """

    block_ids: tuple[int, ...]
    num_slots: int                  # P (pre_seq_len)
    block_size: int

    @property
    def shared_block_ids(self) -> tuple[int, ...]:
        return self.block_ids[:self.num_slots // self.block_size]

    @property
    def tail(self) -> int:
        """Prefix slots that live in each sequence's own first block (copied there from the last pinned block)."""
        return self.num_slots % self.block_size

    @property
    def tail_source_block(self) -> int | None:
        return self.block_ids[-1] if self.tail else None


@dataclass(frozen=True, eq=False)
class AdapterBinding:
    name: str
    kind: AdapterKind
    cache_salt: bytes
    kv_prefix: KVPrefix | None = None

    @property
    def is_lora(self) -> bool:
        return self.kind is AdapterKind.LORA


class UnknownAdapterError(ValueError):
    """A request or an unload names an adapter that is not loaded (gRPC NOT_FOUND)."""

    def __init__(self, name: str, loaded: list[str]):
        known = ", ".join(sorted(loaded)) or "none"
        super().__init__(f"adapter: {name!r} is not loaded (loaded: {known})")
        self.name, self.loaded = name, list(loaded)

    def __reduce__(self):     # crosses from the engine core's process pickled
        return type(self), (self.name, self.loaded)


class AdapterLoadError(ValueError):
    """An adapter folder that cannot be loaded; the message names the file and, where one is at fault, the tensor."""


class AdapterExistsError(ValueError):
    """A load under a name that is already taken (gRPC ALREADY_EXISTS)."""


class AdapterInUseError(RuntimeError):
    """An unload refused because requests still use the adapter (gRPC FAILED_PRECONDITION)."""


class AdapterCapacityError(RuntimeError):
    """No room for another adapter: the KV pool cannot hold a P-tuning prefix (gRPC RESOURCE_EXHAUSTED)."""
