"""What a frontend knows about the engine core behind it: its fixed facts, and its latest counters."""
from __future__ import annotations

from dataclasses import dataclass

from glmserve.engine.core.request_validator import RequestLimits
from glmserve.engine.lora.manager import AdapterInfo


@dataclass(frozen=True)
class EngineInfo:
    """Fixed when the engine starts (sent once by an engine core in its own process)."""

    model_name: str
    tokenizer_path: str
    max_model_len: int
    vocab_size: int
    block_size: int
    num_kv_blocks: int
    dtype: str
    device: str
    enable_prefix_caching: bool
    max_loras: int = 0
    adapters: tuple[AdapterInfo, ...] = ()      # fine-tunes loaded at start-up
    cpu_threads: int = 0                        # torch's intra-op threads in the engine core's process

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(self.vocab_size, self.max_model_len, self.num_kv_blocks, self.block_size)


@dataclass(frozen=True)
class EngineStats:
    """The engine's counters after a step (``num_waiting`` as the scheduler sees it)."""

    num_total_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    kv_cache_usage: float
    running_lora_adapters: tuple[str, ...] = ()     # LoRA adapters of running requests
    waiting_lora_adapters: tuple[str, ...] = ()     # LoRA adapters of waiting requests
