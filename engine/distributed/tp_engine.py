"""The tensor-parallel engine: rank 0 of N, in the server's own process.

The scheduler, block manager, sampler and output processing live only here, exactly as in the one-process
``Engine``. What changes is below them: rank 0 holds its shard of the model, starts the worker ranks (which load
the other shards), and each step sends the runner's flat batch to the workers before running its own shard in
lockstep with theirs; the logits are gathered on rank 0 for sampling. With tensor_parallel_size 1 none of this
exists: ``build_engine`` returns a plain ``Engine``.
"""
from __future__ import annotations

import weakref

import torch

from glmserve.engine.config.engine_config import ConfigError, EngineConfig
from glmserve.engine.runtime.engine_core import Engine
from glmserve.engine.model.loader import ModelSource, load_model, resolve_model_source
from glmserve.engine.model.glm import GLMForCausalLM
from glmserve.engine.worker.model_runner import ModelInputs, ModelRunner
from glmserve.engine.core.outputs import RequestOutput
from glmserve.engine.distributed.batch_transfer import pack_inputs
from glmserve.engine.model.shard_layout import ShardLayout, validate_tensor_parallel
from glmserve.engine.distributed.memory import RankMemory, measure_rank_memory
from glmserve.engine.distributed.protocol import BuildRunner, ProfileForward, ReportMemory, WorkerReady
from glmserve.engine.distributed.worker_pool import TensorParallelError, WorkerPool

# How long start-up stages and collectives may wait for a rank before the engine fails instead of hanging.
COLLECTIVE_TIMEOUT_S = 600.0

__all__ = ["TensorParallelEngine", "TensorParallelError", "build_tensor_parallel_engine"]


def build_tensor_parallel_engine(config: EngineConfig) -> "TensorParallelEngine":
    return TensorParallelEngine(config)


def _release(pool: WorkerPool, process_threads: int) -> None:
    """Stop the workers and give this process its CPU threads back (not a method: the finalizer must not keep
    the engine alive)."""
    pool.shutdown()
    torch.set_num_threads(process_threads)


class DriverRunner(ModelRunner):
    """Rank 0's runner: the step's flat batch goes to the workers, then rank 0 runs its shard with them."""

    def __init__(self, pool: WorkerPool, model: GLMForCausalLM, **runner_args):
        super().__init__(model, **runner_args)
        self.pool = pool

    def run_model(self, inputs: ModelInputs) -> torch.Tensor | None:
        try:
            header, payload = pack_inputs(inputs)
            self.pool.send(header)
            self.pool.group.broadcast(payload)
            return super().run_model(inputs)
        except Exception as exc:   # usually a collective that failed because a worker died
            raise self.pool.failure_for(exc) from exc


class TensorParallelEngine(Engine):
    def __init__(self, config: EngineConfig):
        n = config.tensor_parallel_size
        source = resolve_model_source(config.model, config.load_format, config.tokenizer)
        validate_tensor_parallel(source.config, n)
        device = torch.device(config.device)
        if device.type == "cuda" and torch.cuda.device_count() < n:
            raise ConfigError(f"tensor_parallel_size {n} needs {n} GPUs, found {torch.cuda.device_count()}")
        # The ranks share this process's CPU budget (OMP_NUM_THREADS or the cores): an oversubscribed rank stalls
        # every collective it takes part in.
        process_threads = torch.get_num_threads()
        threads = max(1, process_threads // n)
        self.pool = WorkerPool(config, COLLECTIVE_TIMEOUT_S, threads)
        if device.type == "cpu":
            torch.set_num_threads(threads)
        # Workers stop with the engine: on shutdown(), when the engine is collected, or at interpreter exit.
        self._release = weakref.finalize(self, _release, self.pool, process_threads)
        try:
            super().__init__(config)
        except BaseException:
            self.shutdown()
            raise

    # ---- Engine hooks ------------------------------------------------------------------------------------------
    def _load_model(self, source: ModelSource) -> GLMForCausalLM:
        group = self.pool.join_group()
        layout = ShardLayout(source.config, 0, self.config.tensor_parallel_size)
        model = load_model(source, self.device, self.dtype, self.config.seed, layout, group)
        self.pool.expect(WorkerReady)     # every worker has loaded its shard
        return model

    def _profile_cuda_blocks(self, model, per_block: int) -> int:
        # The profiling forward's collectives need every rank; rank 0's budget (it also holds the full-vocabulary
        # logits) sizes the cache of all of them.
        self.pool.send(ProfileForward(self.config.scheduler.max_num_batched_tokens, self.config.cache.block_size,
                                      self.config.attention_backend))
        return super()._profile_cuda_blocks(model, per_block)

    def _make_runner(self, model: GLMForCausalLM, **runner_args) -> ModelRunner:
        self.pool.request(BuildRunner(runner_args))
        return DriverRunner(self.pool, model, **runner_args)

    def step(self) -> list[RequestOutput]:
        self.pool.check()    # a lost rank fails every step, even one with nothing to run
        return super().step()

    def shutdown(self) -> None:
        self._release()

    # ---- inspection --------------------------------------------------------------------------------------------
    def rank_memory(self) -> list[RankMemory]:
        """Each rank's parameter, KV-cache and resident bytes, rank 0 first."""
        own = measure_rank_memory(0, self.runner.model, self.runner.kv_caches)
        return [own, *self.pool.request(ReportMemory(), RankMemory)]
