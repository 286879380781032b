"""Settings of the fine-tunes served beside the base model: LoRA slots and the adapters loaded at start-up."""
from __future__ import annotations

from dataclasses import dataclass, field

from glmserve.engine.config.errors import ConfigError

# Adapter names: what requests put in their ``adapter`` (or an HTTP request's ``model``) field.
MAX_ADAPTER_NAME_LEN = 256


@dataclass
class LoraConfig:
    max_loras: int = 4                      # LoRA adapters resident (and running) at once; more loaded ones wait, LRU
    max_lora_rank: int = 16                 # the largest rank an adapter may have (the slots' size)
    # Loaded at start-up, as (name, folder): PEFT LoRA adapters (--lora) and P-tuning v2 checkpoints (--ptuning).
    lora_adapters: list[tuple[str, str]] = field(default_factory=list)
    ptuning_prefixes: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ConfigError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ConfigError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        names = [name for name, _ in self.lora_adapters + self.ptuning_prefixes]
        for name in names:
            check_adapter_name(name)
        duplicate = next((n for n in names if names.count(n) > 1), None)
        if duplicate is not None:
            raise ConfigError(f"adapter name {duplicate!r} is given twice")


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not name or len(name) > MAX_ADAPTER_NAME_LEN or not name.isprintable() \
            or any(c.isspace() for c in name):
        raise ConfigError(f"adapter name must be 1-{MAX_ADAPTER_NAME_LEN} printable characters without spaces, "
                          f"got {name!r}")
