"""The engine core: one step = schedule, run the model, update. Synchronous and single-threaded.

The offline ``LLM`` drives it directly; servers run it behind ``AsyncEngine``, in a thread of their own process
or, as ``glmserve serve`` does, in a process of its own (core_process.py). It knows nothing of chats or protocols:
a request is a prompt of token ids and its sampling parameters.
"""
from __future__ import annotations

import logging
import time
from typing import Iterator

import torch

from glmserve.engine.attention.backends import check_backend
from glmserve.engine.config.engine_config import EngineConfig
from glmserve.engine.config.errors import ConfigError
from glmserve.engine.core.adapters import AdapterInUseError, AdapterKind, KVPrefix
from glmserve.engine.core.block_manager import BlockManager
from glmserve.engine.core.errors import DuplicateRequestError, RequestError
from glmserve.engine.core.outputs import RequestOutput
from glmserve.engine.core.request import Request
from glmserve.engine.core.request_validator import RequestLimits, validate_request
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.core.scheduler import Scheduler
from glmserve.engine.distributed.tp_executor import TensorParallelExecutor
from glmserve.engine.lora.manager import AdapterInfo, AdapterManager
from glmserve.engine.model.loader import ModelSource, resolve_dtype, resolve_model_source
from glmserve.engine.runtime.engine_info import EngineInfo, EngineStats
from glmserve.engine.runtime.output_processor import OutputProcessor, TokenEvent
from glmserve.engine.structured.compiler import StructuredOutputs
from glmserve.engine.structured.request_grammar import advance_grammars
from glmserve.engine.text.tokenizer import ChatGLMTokenizer
from glmserve.engine.worker.cuda_graph import CudaGraphCapture
from glmserve.engine.worker.executor import LocalExecutor
from glmserve.engine.worker.model_runner import ModelRunner

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_CACHE_BYTES = 2 * 1024 ** 3


def make_executor(config: EngineConfig) -> LocalExecutor:
    return TensorParallelExecutor(config) if config.tensor_parallel_size > 1 else LocalExecutor(config)


class EngineCore:
    def __init__(self, config: EngineConfig, executor: LocalExecutor | None = None):
        self.config = config
        source = resolve_model_source(config.model, config.load_format, config.tokenizer)
        self.source = source
        self.model_name = source.name
        self.model_config = source.config
        self.tokenizer = ChatGLMTokenizer.from_file(source.tokenizer_path)
        self.device = torch.device(config.device)
        self.max_model_len = config.scheduler.max_model_len or source.config.seq_length
        self._check_settings(source)        # before the (possibly minutes-long) model load
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.executor = executor or make_executor(config)
        try:
            model = self.executor.load_model(source, self.device, self.dtype)
            block_size = config.cache.block_size
            self.num_blocks = self._num_kv_blocks(model)
            self.runner = self.executor.make_runner(
                model, num_blocks=self.num_blocks, block_size=block_size, max_model_len=self.max_model_len,
                vocab_size=self.tokenizer.vocab_size, eos_token_id=self.tokenizer.eos_token_id,
                attention_backend=config.attention_backend)
            self.runner.warm_up()   # compiles every Triton kernel variant now, not during the first requests
        except BaseException:
            self.executor.shutdown()
            raise
        if config.cuda_graphs:
            self.runner.enable_decode_graphs(CudaGraphCapture(self.device), config.scheduler.max_num_seqs)
        self.limits = RequestLimits(self.tokenizer.vocab_size, self.max_model_len, self.num_blocks, block_size)
        self.block_manager = BlockManager(self.num_blocks, block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_model_len,
                                   self.tokenizer.eos_token_id, max_loras=config.lora.max_loras)
        self.adapters = AdapterManager(
            self.runner, self.block_manager, model.config, config.lora, self.dtype,
            ModelRunner.kv_bytes_per_block(model.config, block_size, self.dtype), config.tensor_parallel_size > 1)
        try:
            for name, path in config.lora.lora_adapters:
                self.adapters.load(name, path, AdapterKind.LORA)
            for name, path in config.lora.ptuning_prefixes:
                self.adapters.load(name, path, AdapterKind.PTUNING)
        except BaseException:
            self.executor.shutdown()
            raise
        self.output_processor = OutputProcessor(self.tokenizer)
        self.structured = StructuredOutputs(self.tokenizer, self.model_config.padded_vocab_size)
        self._compiling: list[Request] = []   # constrained requests whose grammar is not compiled yet
        self._aborted: list[Request] = []
        self.last_step_num_tokens = 0      # tokens computed by the latest step (a metrics histogram reads it)
        self._samples: dict[str, list[Request]] = {}   # request id -> its n sample requests, while in flight

    def _check_settings(self, source: ModelSource) -> None:
        config, model_config = self.config, source.config
        if self.tokenizer.vocab_size > model_config.padded_vocab_size:
            raise ConfigError(f"the tokenizer has {self.tokenizer.vocab_size} ids but the model's padded_vocab_size "
                              f"is {model_config.padded_vocab_size}")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device cuda was requested but no CUDA device is available")
        if self.max_model_len > model_config.seq_length:
            raise ConfigError(f"max_model_len {self.max_model_len} exceeds the model's seq_length "
                              f"{model_config.seq_length}")
        check_backend(config.attention_backend, self.device)   # a backend that cannot run here fails before the load
        if not config.scheduler.enable_chunked_prefill and config.scheduler.max_num_batched_tokens < self.max_model_len:
            # Without chunking a prompt (or a recompute after preemption) must fit one step's token budget.
            raise ConfigError(f"with chunked prefill off, max_num_batched_tokens "
                              f"({config.scheduler.max_num_batched_tokens}) must be at least max_model_len "
                              f"({self.max_model_len})")

    def shutdown(self) -> None:
        """Release what outlives the engine object (a tensor-parallel executor's worker processes)."""
        self.structured.shutdown()
        self.executor.shutdown()

    # ---- sizing -----------------------------------------------------------------------------------------------
    def _num_kv_blocks(self, model) -> int:
        cache = self.config.cache
        # model.config: a tensor-parallel rank's own share of the KV heads
        per_block = ModelRunner.kv_bytes_per_block(model.config, cache.block_size, self.dtype)
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        if cache.kv_cache_memory is not None:
            num = cache.kv_cache_memory // per_block
        elif self.device.type == "cuda":
            num = self._profile_cuda_blocks(model, per_block)
        else:
            # Enough for every sequence slot at full length, capped at a fixed host-memory budget.
            wanted = self.config.scheduler.max_num_seqs * -(-self.max_model_len // cache.block_size)
            num = min(wanted, CPU_DEFAULT_KV_CACHE_BYTES // per_block)
        if num < 1:
            raise ConfigError(f"kv_cache_memory: the KV cache budget holds no block of {per_block} bytes")
        return int(num)

    def _profile_cuda_blocks(self, model, per_block: int) -> int:
        """Blocks that fit in ``gpu_memory_utilization`` of the card after weights and one full-size forward."""
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = int(total * self.config.cache.gpu_memory_utilization) - self.executor.peak_forward_memory(model)
        return max(0, budget // per_block)

    # ---- what frontends need to know ---------------------------------------------------------------------------
    def info(self) -> EngineInfo:
        return EngineInfo(model_name=self.model_name, tokenizer_path=str(self.source.tokenizer_path),
                          max_model_len=self.max_model_len, vocab_size=self.tokenizer.vocab_size,
                          block_size=self.config.cache.block_size, num_kv_blocks=self.num_blocks,
                          dtype=str(self.dtype).removeprefix("torch."), device=str(self.device),
                          enable_prefix_caching=self.config.cache.enable_prefix_caching,
                          max_loras=self.config.lora.max_loras, adapters=tuple(self.adapters.list()),
                          cpu_threads=torch.get_num_threads())

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_total_blocks=bm.num_blocks, num_free_blocks=bm.num_free_blocks,
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            num_preemptions=self.scheduler.stats.num_preemptions, prefix_cache_queries=bm.stats.queries,
            prefix_cache_hits=bm.stats.hits, kv_cache_usage=bm.usage,
            running_lora_adapters=tuple(sorted(self.scheduler.running_lora_adapters())),
            waiting_lora_adapters=tuple(sorted({r.adapter.name for _, _, r in self.scheduler.waiting
                                                if r.adapter is not None and r.adapter.is_lora})))

    # ---- requests ---------------------------------------------------------------------------------------------
    def validate_request(self, prompt_token_ids, params: SamplingParams) -> tuple[list[int], SamplingParams]:
        """The prompt and the params a request will run with; raises RequestError / SamplingParamsError (a bad
        schema, regex or grammar too, naming the problem)."""
        prompt, params = validate_request(prompt_token_ids, params, self.limits)
        if params.structured is not None:
            self.structured.validate(params.structured, chat=params.strip_reply_prefix)
        return prompt, params

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    priority: int = 0, arrival_time: float | None = None, adapter: str | None = None) -> None:
        """Queue a request; ``n`` > 1 becomes n sample requests under the same id, sharing the prompt's cached
        blocks. ``adapter`` names a loaded fine-tune (LoRA or P-tuning) to run under; None runs the base model.
        Raises what ``validate_request`` raises, UnknownAdapterError, and DuplicateRequestError for an id already
        in flight."""
        if request_id in self._samples:
            raise DuplicateRequestError(f"request id {request_id!r} is already in flight")
        binding = self.adapters.binding(adapter) if adapter is not None else None
        prompt, params = self.validate_request(prompt_token_ids, params)
        if binding is not None and binding.kv_prefix is not None:
            self._check_prefix_room(binding.kv_prefix, len(prompt) + params.max_tokens)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        samples = []
        for index in range(params.n):
            sample_params = params if params.n == 1 else params.clone(
                n=1, seed=None if params.seed is None else params.seed + index)
            samples.append(Request(request_id, prompt, sample_params, priority=priority, arrival_time=arrival,
                                   index=index, adapter=binding))
        for request in samples:
            if params.structured is not None:   # each sample its own matcher; the compile is shared
                request.grammar = self.structured.request_grammar(params.structured, chat=params.strip_reply_prefix,
                                                                  stop_token_ids=params.stop_token_ids)
                self._compiling.append(request)
            self.output_processor.add(request)
            self.scheduler.add(request)
        self._samples[request_id] = samples

    def _check_prefix_room(self, prefix: KVPrefix, num_tokens: int) -> None:
        """A P-tuning request's own blocks must fit beside every pinned prefix (its own shared blocks included)."""
        bm = self.block_manager
        own = bm.blocks_needed(prefix.num_slots + num_tokens) - len(prefix.shared_block_ids)
        room = bm.num_blocks - sum(len(p.block_ids) for p in bm.pinned)
        if own > room:
            raise RequestError("max_tokens", f"the request needs {own} KV blocks for prompt + max_tokens = "
                               f"{num_tokens} tokens after its {prefix.num_slots}-slot prefix, but {room} blocks are "
                               "not pinned by prefixes")

    # ---- fine-tunes -------------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str, kind: AdapterKind | None = None) -> AdapterInfo:
        """Load a LoRA adapter or a P-tuning v2 prefix under ``name`` (core/adapters.py lists what it raises)."""
        return self.adapters.load(name, path, kind)

    def unload_adapter(self, name: str) -> None:
        """Unload an adapter; refused (AdapterInUseError) while any waiting or running request uses it."""
        binding = self.adapters.binding(name)
        using = sum(1 for r in self.scheduler.requests.values() if r.adapter is binding)
        if using:
            raise AdapterInUseError(f"adapter: {name!r} is used by {using} request(s) in flight; abort them or "
                                    "wait for them to finish, then unload it")
        self.adapters.unload(name)

    def lora_stats(self) -> dict:
        """LoRA adapters with running / waiting requests, and how many may run at once."""
        stats = self.stats()
        return {"max_lora": self.config.lora.max_loras, "running": list(stats.running_lora_adapters),
                "waiting": list(stats.waiting_lora_adapters)}

    def abort_request(self, request_id: str) -> bool:
        """Abort a request (all of its n samples); its blocks are freed at once. False if unknown."""
        found = False
        for request in self._samples.get(request_id, ()):
            if self.scheduler.abort(request.key) is not None:
                self._aborted.append(request)
                found = True
        return found

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    def in_flight_request_ids(self) -> list[str]:
        return list(self._samples)

    # ---- the step ---------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self.executor.check()
        if self._compiling:
            self._check_compiles()
        outputs = [self.output_processor.finished_output(r) for r in self._aborted]
        self._aborted.clear()
        batch = self.scheduler.schedule()
        self.last_step_num_tokens = batch.total_tokens
        if len(batch):
            tables = [self.block_manager.block_ids(r) for r in batch.requests]
            result = self.runner.execute(batch, tables)
            new_tokens = self.scheduler.update(batch, result.token_ids)
            advance_grammars(new_tokens, self.scheduler.finish)
            position = {id(r): i for i, r in enumerate(batch.requests)}
            events = [TokenEvent(r, t, result.logprobs[position[id(r)]], result.top_logprobs[position[id(r)]])
                      for r, t in new_tokens]
            outputs += self.output_processor.process(events, self.scheduler.finish)
        for out in outputs:
            if out.finished:
                self._forget_if_done(out.request_id)
        return outputs

    def warm_up(self) -> None:
        """One short request through the whole path, before a server reports that it is ready."""
        self.add_request("__warmup__", self.tokenizer.encode("warm up"), SamplingParams(max_tokens=2, temperature=0.0))
        for _ in self.step_until_idle():
            pass

    def step_until_idle(self) -> Iterator[RequestOutput]:
        """Step until nothing is left to run, yielding every delta."""
        while self.has_unfinished_requests():
            yield from self.step()

    def _check_compiles(self) -> None:
        """Forget requests whose grammar compiled; abort those whose compile failed (parsing had passed, so this
        is the grammar engine's own failure: logged, and the request ends with finish reason abort)."""
        still = []
        for request in self._compiling:
            error = None if request.is_finished else request.grammar.error
            if error is not None:
                log.error("request %s: compiling its grammar failed: %s", request.request_id, error)
                if self.scheduler.abort(request.key) is not None:
                    self._aborted.append(request)
            elif not request.is_finished and not request.grammar.is_ready:
                still.append(request)
        self._compiling = still

    def _forget_if_done(self, request_id: str) -> None:
        samples = self._samples.get(request_id)
        if samples is not None and all(r.is_finished for r in samples):
            del self._samples[request_id]
