"""The engine's settings: one typed tree (EngineConfig with its cache and scheduler sections), built from CLI flags
or ``LLM(...)`` keywords (options.py); components copy what they need. Each setting's default lives here, once."""
from __future__ import annotations

from dataclasses import dataclass, field

from glmserve.engine.config.errors import ConfigError
from glmserve.engine.config.lora_config import LoraConfig

LOAD_FORMATS = ("auto", "safetensors", "bin", "dummy")
DTYPES = ("auto", "float32", "float16", "bfloat16")
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")
DEVICES = ("cpu", "cuda")

@dataclass
class CacheConfig:
    block_size: int = 16
    num_kv_blocks: int | None = None        # explicit pool size wins
    kv_cache_memory: int | None = None      # bytes for K and V of all layers
    gpu_memory_utilization: float = 0.90    # CUDA only: fraction of the card after a profiling pass
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ConfigError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise ConfigError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    max_model_len: int | None = None        # defaults to the model's seq_length

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass
class EngineConfig:
    model: str                              # a checkpoint directory or a preset name
    load_format: str = "auto"               # auto | safetensors | bin | dummy
    tokenizer: str | None = None            # tokenizer.model path (default: the checkpoint's, or the embedded one)
    device: str = "cpu"
    dtype: str = "auto"                     # auto | float32 | float16 | bfloat16
    attention_backend: str = "auto"         # auto | torch | cpu (native decode kernel) | triton
    seed: int = 0
    tensor_parallel_size: int = 1
    cuda_graphs: bool = False               # capture decode steps as CUDA graphs (CUDA, tensor_parallel_size 1)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)                 # fine-tunes (config/lora_config.py)

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "safetensors", "bin", "dummy"):
            raise ConfigError(f"load_format must be auto, safetensors, bin or dummy, got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ConfigError(f"dtype must be auto, float32, float16 or bfloat16, got {self.dtype!r}")
        if self.attention_backend not in ("auto", "torch", "cpu", "triton"):
            raise ConfigError(f"attention_backend must be auto, torch, cpu or triton, got {self.attention_backend!r}")
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.cuda_graphs and not str(self.device).startswith("cuda"):
            raise ConfigError(f"cuda_graphs needs a CUDA device, got device {self.device!r}")
        if self.cuda_graphs and self.tensor_parallel_size > 1:
            raise ConfigError("cuda_graphs runs with tensor_parallel_size 1 only (tensor-parallel workers run eagerly)")
