"""The tensor-parallel executor: rank 0 of N, in the engine core's process.

The scheduler, block manager, sampler and output processing live only in the engine core above it, exactly as
with one process. What changes is below them: rank 0 holds its shard of the model, starts the worker ranks (which
load the other shards), and each step sends the runner's flat batch to the workers before running its own shard
in lockstep with theirs; the logits are gathered on rank 0 for sampling. With tensor_parallel_size 1 none of this
exists: the engine core uses a ``LocalExecutor``.
"""
from __future__ import annotations

import weakref

import torch

from glmserve.engine.config.engine_config import EngineConfig
from glmserve.engine.config.errors import ConfigError
from glmserve.engine.distributed.batch_transfer import pack_inputs
from glmserve.engine.distributed.memory import RankMemory, measure_rank_memory
from glmserve.engine.distributed.protocol import BuildRunner, ProfileForward, ReportMemory, WorkerReady
from glmserve.engine.distributed.worker_pool import TensorParallelError, WorkerPool
from glmserve.engine.model.glm import GLMForCausalLM
from glmserve.engine.model.loader import ModelSource, load_model, resolve_model_source
from glmserve.engine.model.shard_layout import ShardLayout, validate_tensor_parallel
from glmserve.engine.worker.executor import LocalExecutor
from glmserve.engine.worker.model_runner import ModelInputs, ModelRunner

# How long start-up stages and collectives may wait for a rank before the engine fails instead of hanging.
COLLECTIVE_TIMEOUT_S = 600.0

__all__ = ["TensorParallelExecutor", "TensorParallelError"]


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


class TensorParallelExecutor(LocalExecutor):
    def __init__(self, config: EngineConfig):
        super().__init__(config)
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
        # Workers stop with the executor: on shutdown(), when it is collected, or at interpreter exit.
        self._release = weakref.finalize(self, _release, self.pool, process_threads)

    def load_model(self, source: ModelSource, device: torch.device, dtype: torch.dtype) -> GLMForCausalLM:
        group = self.pool.join_group()
        layout = ShardLayout(source.config, 0, self.config.tensor_parallel_size)
        model = load_model(source, device, dtype, self.config.seed, layout, group)
        self.pool.expect(WorkerReady)     # every worker has loaded its shard
        return model

    def peak_forward_memory(self, model: GLMForCausalLM) -> int:
        # The profiling forward's collectives need every rank; rank 0's budget (it also holds the full-vocabulary
        # logits) sizes the cache of all of them.
        self.pool.send(ProfileForward(self.config.scheduler.max_num_batched_tokens, self.config.cache.block_size,
                                      self.config.attention_backend))
        return super().peak_forward_memory(model)

    def make_runner(self, model: GLMForCausalLM, **runner_args) -> ModelRunner:
        # Rank 0 first: a backend that cannot run here is a ConfigError before any worker builds its runner.
        runner = DriverRunner(self.pool, model, **runner_args)
        self.pool.request(BuildRunner(runner_args))
        return runner

    def check(self) -> None:
        self.pool.check()    # a lost rank fails every step, even one with nothing to run

    def shutdown(self) -> None:
        self._release()

    def rank_memory(self, runner: ModelRunner) -> list[RankMemory]:
        """Each rank's parameter, KV-cache and resident bytes, rank 0 first."""
        own = measure_rank_memory(0, runner.model, runner.kv_caches)
        return [own, *self.pool.request(ReportMemory(), RankMemory)]
