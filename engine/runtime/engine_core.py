"""The engine: one step = schedule, run the model, update. Synchronous; servers wrap it in AsyncEngine."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from glmserve.engine.core.block_manager import BlockManager
from glmserve.engine.config.engine_config import ConfigError, EngineConfig
from glmserve.engine.core.errors import DuplicateRequestError, RequestError
from glmserve.engine.model.loader import ModelSource, load_model, resolve_dtype, resolve_model_source
from glmserve.engine.model.glm import GLMForCausalLM
from glmserve.engine.worker.model_runner import ModelRunner
from glmserve.engine.runtime.output_processor import OutputProcessor, TokenEvent
from glmserve.engine.core.outputs import RequestOutput
from glmserve.engine.core.request import Request
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.core.scheduler import Scheduler
from glmserve.engine.text.tokenizer import ChatGLMTokenizer

log = logging.getLogger(__name__)

CPU_DEFAULT_KV_CACHE_BYTES = 2 * 1024 ** 3


@dataclass
class EngineStats:
    num_total_blocks: int
    num_free_blocks: int
    num_running: int
    num_waiting: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    kv_cache_usage: float


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        source = resolve_model_source(config.model, config.load_format, config.tokenizer)
        self.model_name = source.name
        self.model_config = source.config
        self.tokenizer = ChatGLMTokenizer.from_file(source.tokenizer_path)
        self.device = torch.device(config.device)
        self.max_model_len = config.scheduler.max_model_len or source.config.seq_length
        self._check_settings(source)        # before the (possibly minutes-long) model load
        self.dtype = resolve_dtype(config.dtype, self.device)
        torch.manual_seed(config.seed)
        model = self._load_model(source)
        block_size = config.cache.block_size
        self.num_blocks = self._num_kv_blocks(model)
        self.runner = self._make_runner(model, num_blocks=self.num_blocks, block_size=block_size,
                                        max_model_len=self.max_model_len, vocab_size=self.tokenizer.vocab_size,
                                        eos_token_id=self.tokenizer.eos_token_id,
                                        attention_backend=config.attention_backend)
        if config.cuda_graphs:
            from glmserve.engine.worker.cuda_graph import CudaGraphCapture
            self.runner.enable_decode_graphs(CudaGraphCapture(self.device), config.scheduler.max_num_seqs)
        self.block_manager = BlockManager(self.num_blocks, block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager, self.max_model_len,
                                   self.tokenizer.eos_token_id)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._aborted: list[Request] = []
        self.last_step_num_tokens = 0      # tokens computed by the latest step (a metrics histogram reads it)
        self._children: dict[str, list[str]] = {}

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
        if not config.scheduler.enable_chunked_prefill and config.scheduler.max_num_batched_tokens < self.max_model_len:
            # Without chunking a prompt (or a recompute after preemption) must fit one step's token budget.
            raise ConfigError(f"with chunked prefill off, max_num_batched_tokens "
                              f"({config.scheduler.max_num_batched_tokens}) must be at least max_model_len "
                              f"({self.max_model_len})")

    # ---- model and runner (a tensor-parallel engine overrides these two) ---------------------------------------
    def _load_model(self, source: ModelSource) -> GLMForCausalLM:
        return load_model(source, self.device, self.dtype, self.config.seed)

    def _make_runner(self, model: GLMForCausalLM, **runner_args) -> ModelRunner:
        return ModelRunner(model, **runner_args)

    def shutdown(self) -> None:
        """Release what outlives the engine object (a tensor-parallel engine's worker processes)."""

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
        from glmserve.engine.worker.profiling import peak_forward_memory
        peak = peak_forward_memory(model, self.config.scheduler.max_num_batched_tokens, self.config.cache.block_size,
                                   self.config.attention_backend)
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = int(total * self.config.cache.gpu_memory_utilization) - peak
        return max(0, budget // per_block)

    # ---- requests ---------------------------------------------------------------------------------------------
    def validate_request(self, prompt_token_ids, params: SamplingParams, *,
                         chat: bool = False) -> tuple[list[int], SamplingParams]:
        """Check a request without queuing it; returns its prompt and the params it will run with.

        Reads only settings fixed at start-up, so a server may call it from its own thread. Raises RequestError /
        SamplingParamsError (both ValueError, naming the field).
        """
        prompt = self._validate_prompt(prompt_token_ids)
        params.validate(vocab_size=self.tokenizer.vocab_size, max_model_len=self.max_model_len,
                        prompt_len=len(prompt))
        changes: dict = {}
        if params.max_tokens is None:
            changes["max_tokens"] = self.max_model_len - len(prompt)
        if chat:   # ChatGLM3 replies end with eos, <|user|> or <|observation|>
            extra = [t for t in self.tokenizer.chat_stop_token_ids if t not in params.stop_token_ids]
            changes["stop_token_ids"] = list(params.stop_token_ids) + extra
        params = params.clone(**changes) if changes else params
        needed = self.block_manager.blocks_needed(len(prompt) + params.max_tokens)
        if needed > self.num_blocks:
            raise RequestError("max_tokens", f"the request needs {needed} KV blocks for prompt + max_tokens = "
                               f"{len(prompt) + params.max_tokens} tokens, but the cache has {self.num_blocks}")
        return prompt, params

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                    priority: int = 0, chat: bool = False, arrival_time: float | None = None) -> None:
        """Queue a request (``n`` > 1 becomes n child requests sharing the prompt's cached blocks).

        Raises what ``validate_request`` raises, and DuplicateRequestError for an id already in flight.
        """
        if request_id in self._children or request_id in self.scheduler.requests:
            raise DuplicateRequestError(f"request id {request_id!r} is already in flight")
        prompt, params = self.validate_request(prompt_token_ids, params, chat=chat)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        for index, child_id in enumerate(ids):
            child_params = params if params.n == 1 else params.clone(
                n=1, seed=None if params.seed is None else params.seed + index)
            request = Request(child_id, prompt, child_params, priority=priority, arrival_time=arrival, index=index,
                              parent_id=None if params.n == 1 else request_id)
            self.output_processor.add(request, strip_reply_prefix=chat)
            self.scheduler.add(request)
        self._children[request_id] = ids

    def _validate_prompt(self, prompt_token_ids) -> list[int]:
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise RequestError("prompt", "the prompt is empty")
        bad = next((t for t in prompt if not 0 <= t < self.tokenizer.vocab_size), None)
        if bad is not None:
            raise RequestError("prompt_token_ids", f"token id {bad} is outside the vocabulary "
                               f"[0, {self.tokenizer.vocab_size})")
        if len(prompt) >= self.max_model_len:
            raise RequestError("prompt", f"the prompt has {len(prompt)} tokens; max_model_len is "
                               f"{self.max_model_len} and at least one token must be generated")
        return prompt

    def abort_request(self, request_id: str) -> bool:
        """Abort a request (all of its n samples); its blocks are freed at once. False if unknown."""
        found = False
        for child_id in self._children.get(request_id, [request_id]):
            request = self.scheduler.abort(child_id)
            if request is not None:
                self._aborted.append(request)
                found = True
        return found

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted)

    # ---- the step ---------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs = [self.output_processor.finished_output(r) for r in self._aborted]
        self._aborted.clear()
        batch = self.scheduler.schedule()
        self.last_step_num_tokens = batch.total_tokens
        if len(batch):
            tables = [self.block_manager.block_ids(r.request_id) for r in batch.requests]
            result = self.runner.execute(batch, tables)
            new_tokens = self.scheduler.update(batch, result.token_ids)
            position = {id(r): i for i, r in enumerate(batch.requests)}
            events = [TokenEvent(r, t, result.logprobs[position[id(r)]], result.top_logprobs[position[id(r)]])
                      for r, t in new_tokens]
            outputs += self.output_processor.process(events, self.scheduler.finish)
        for out in outputs:
            if out.finished:
                self._forget_child(out)
        return outputs

    def _forget_child(self, out: RequestOutput) -> None:
        ids = self._children.get(out.request_id)
        if ids is not None and not any(i in self.scheduler.requests for i in ids):
            del self._children[out.request_id]

    def stats(self) -> dict:
        bm = self.block_manager
        return vars(EngineStats(
            num_total_blocks=bm.num_blocks, num_free_blocks=bm.num_free_blocks,
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            num_preemptions=self.scheduler.stats.num_preemptions, prefix_cache_queries=bm.stats.queries,
            prefix_cache_hits=bm.stats.hits, kv_cache_usage=bm.usage))
