"""The engine's fine-tunes by name: loading, unloading and resolving what a request names.

One namespace for both kinds: a LoRA adapter (PEFT folder: ``adapter_config.json``) or a P-tuning v2 prefix
(``config.json`` with ``pre_seq_len``). Loading a LoRA keeps its weights on the host and registers it with the
runner's slots (allocated when the first LoRA loads); loading a P-tuning prefix computes its K/V once, pins
``ceil(P / block_size)`` KV blocks for it in the block manager and writes the K/V there.

Unloading an adapter that requests still use (waiting or running) is refused (``AdapterInUseError``): the caller
aborts or waits for them and tries again. A refusal is immediate and clear; waiting inside the call would hold the
caller for as long as the longest request runs.
"""
from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from glmserve.engine.config.errors import ConfigError
from glmserve.engine.config.model_config import ModelConfig
from glmserve.engine.config.lora_config import LoraConfig, check_adapter_name
from glmserve.engine.core.adapters import (AdapterBinding, AdapterCapacityError, AdapterExistsError, AdapterKind,
                                           AdapterLoadError, UnknownAdapterError)
from glmserve.engine.core.block_manager import BlockManager
from glmserve.engine.lora.peft_adapter import is_lora_adapter, load_peft_adapter
from glmserve.engine.lora.ptuning import is_ptuning_checkpoint, load_ptuning_prefix
from glmserve.engine.lora.slots import LoraSlots


class AdapterRunner(Protocol):
    """What the manager needs of the model runner (engine/worker/model_runner.py)."""

    lora_slots: LoraSlots | None

    def enable_lora(self, max_loras: int, max_rank: int) -> LoraSlots: ...

    def write_prefix_kv(self, prefix, keys: torch.Tensor, values: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    kind: AdapterKind
    path: str
    rank: int | None                # LoRA: r
    pre_seq_len: int | None         # P-tuning: P
    host_bytes: int                 # LoRA: its weights kept on the host (one slot on the device when resident)
    kv_bytes: int                   # P-tuning: the pinned KV blocks of its prefix


class AdapterManager:
    def __init__(self, runner: AdapterRunner, block_manager: BlockManager, model_config: ModelConfig,
                 config: LoraConfig, dtype: torch.dtype, kv_bytes_per_block: int, tensor_parallel: bool = False):
        self.runner, self.block_manager = runner, block_manager
        self.model_config, self.config, self.dtype = model_config, config, dtype
        self.kv_bytes_per_block = kv_bytes_per_block
        self.tensor_parallel = tensor_parallel
        self._bindings: dict[str, AdapterBinding] = {}
        self._info: dict[str, AdapterInfo] = {}
        self._serial = itertools.count()

    # ---- queries ----------------------------------------------------------------------------------------------
    def binding(self, name: str) -> AdapterBinding:
        binding = self._bindings.get(name)
        if binding is None:
            raise UnknownAdapterError(name, list(self._bindings))
        return binding

    def list(self) -> list[AdapterInfo]:
        return [self._info[name] for name in sorted(self._info)]

    # ---- load and unload --------------------------------------------------------------------------------------
    def load(self, name: str, path: str, kind: AdapterKind | None = None) -> AdapterInfo:
        """Load a fine-tune under ``name``; ``kind`` None: told by the folder's files. Raises AdapterLoadError
        (naming the file and tensor), AdapterExistsError, AdapterCapacityError; nothing changes on failure."""
        try:
            check_adapter_name(name)
        except ConfigError as exc:
            raise AdapterLoadError(str(exc)) from None
        if name in self._bindings:
            raise AdapterExistsError(f"adapter: {name!r} is already loaded (unload it first)")
        if self.tensor_parallel:
            raise AdapterLoadError("adapters are not supported with tensor_parallel_size > 1")
        folder = Path(path)
        if not folder.is_dir():
            raise AdapterLoadError(f"{path}: not a directory")
        if kind is None:
            kind = AdapterKind.LORA if is_lora_adapter(folder) else \
                AdapterKind.PTUNING if is_ptuning_checkpoint(folder) else None
            if kind is None:
                raise AdapterLoadError(f"{path}: neither a LoRA adapter (adapter_config.json) nor a P-tuning v2 "
                                       "checkpoint (config.json with pre_seq_len)")
        salt = hashlib.sha256(f"{kind.value}\0{name}\0{next(self._serial)}".encode()).digest()
        if kind is AdapterKind.LORA:
            info, binding = self._load_lora(name, folder, salt)
        else:
            info, binding = self._load_ptuning(name, folder, salt)
        self._bindings[name], self._info[name] = binding, info
        return info

    def unload(self, name: str) -> None:
        """Forget an adapter nobody uses any more (the engine checks that first)."""
        binding = self.binding(name)
        if binding.is_lora:
            self.runner.lora_slots.remove(name)
        else:
            self.block_manager.unpin_prefix(binding.kv_prefix)
        del self._bindings[name], self._info[name]

    def _load_lora(self, name: str, folder: Path, salt: bytes) -> tuple[AdapterInfo, AdapterBinding]:
        adapter = load_peft_adapter(name, folder, self.model_config, self.config.max_lora_rank, self.dtype)
        slots = self.runner.enable_lora(self.config.max_loras, self.config.max_lora_rank)
        slots.add(adapter)
        info = AdapterInfo(name, AdapterKind.LORA, str(folder), adapter.rank, None, adapter.nbytes(), 0)
        return info, AdapterBinding(name, AdapterKind.LORA, salt)

    def _load_ptuning(self, name: str, folder: Path, salt: bytes) -> tuple[AdapterInfo, AdapterBinding]:
        prefix_kv = load_ptuning_prefix(name, folder, self.model_config)
        bm = self.block_manager
        if not bm.can_pin(prefix_kv.pre_seq_len):
            raise AdapterCapacityError(f"adapter {name!r}: its prefix of {prefix_kv.pre_seq_len} slots needs "
                                       f"{bm.blocks_needed(prefix_kv.pre_seq_len)} KV blocks, "
                                       f"{bm.num_free_blocks} are free")
        prefix = bm.pin_prefix(prefix_kv.pre_seq_len)
        self.runner.write_prefix_kv(prefix, prefix_kv.keys, prefix_kv.values)
        info = AdapterInfo(name, AdapterKind.PTUNING, str(folder), None, prefix_kv.pre_seq_len, 0,
                           len(prefix.block_ids) * self.kv_bytes_per_block)
        return info, AdapterBinding(name, AdapterKind.PTUNING, salt, prefix)
