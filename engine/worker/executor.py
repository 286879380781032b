"""The executor: how the engine core gets its model loaded and run. This one does it in the engine core's own
process; the tensor-parallel executor (engine/distributed/tp_executor.py) also drives the worker ranks that hold
the other shards. The engine core above it does the same thing either way."""
from __future__ import annotations

import torch

from glmserve.engine.config.engine_config import EngineConfig
from glmserve.engine.model.glm import GLMForCausalLM
from glmserve.engine.model.loader import ModelSource, load_model
from glmserve.engine.worker.model_runner import ModelRunner
from glmserve.engine.worker.profiling import peak_forward_memory


class LocalExecutor:
    def __init__(self, config: EngineConfig):
        self.config = config

    def load_model(self, source: ModelSource, device: torch.device, dtype: torch.dtype) -> GLMForCausalLM:
        return load_model(source, device, dtype, self.config.seed)

    def peak_forward_memory(self, model: GLMForCausalLM) -> int:
        """CUDA: peak bytes of one full-size forward pass beside the weights (sizes the KV cache)."""
        return peak_forward_memory(model, self.config.scheduler.max_num_batched_tokens, self.config.cache.block_size,
                                   self.config.attention_backend)

    def make_runner(self, model: GLMForCausalLM, **runner_args) -> ModelRunner:
        return ModelRunner(model, **runner_args)

    def check(self) -> None:
        """Raise if steps can no longer run (a tensor-parallel rank was lost); nothing can go wrong here."""

    def shutdown(self) -> None:
        """Release what outlives the engine (a tensor-parallel executor's worker processes)."""
