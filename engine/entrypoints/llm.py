"""The offline API, shaped like vLLM's: ``LLM(model).generate(prompts, sampling_params)``."""
from __future__ import annotations

import itertools
from typing import Sequence

from glmserve.engine.text.chat_format import ChatMessage, build_chat_prompt, messages_from_json
from glmserve.engine.config.engine_config import CacheConfig, EngineConfig, SchedulerConfig
from glmserve.engine.runtime.engine_core import Engine
from glmserve.engine.core.outputs import CompletionOutput, RequestOutput
from glmserve.engine.core.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, *, load_format: str = "auto", tokenizer: str | None = None, device: str = "cpu",
                 dtype: str = "auto", block_size: int = 16, num_kv_blocks: int | None = None,
                 kv_cache_memory: int | None = None, gpu_memory_utilization: float = 0.9, max_num_seqs: int = 128,
                 max_num_batched_tokens: int = 2048, max_model_len: int | None = None,
                 enable_prefix_caching: bool = True, enable_chunked_prefill: bool = True,
                 attention_backend: str = "auto", seed: int = 0, tensor_parallel_size: int = 1,
                 cuda_graphs: bool = False):
        config = EngineConfig(
            model=model, load_format=load_format, tokenizer=tokenizer, device=device, dtype=dtype,
            attention_backend=attention_backend, seed=seed, tensor_parallel_size=tensor_parallel_size,
            cuda_graphs=cuda_graphs, cache=CacheConfig(block_size=block_size, num_kv_blocks=num_kv_blocks, kv_cache_memory=kv_cache_memory,
                              gpu_memory_utilization=gpu_memory_utilization,
                              enable_prefix_caching=enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                      enable_chunked_prefill=enable_chunked_prefill, max_model_len=max_model_len))
        self.engine = build_engine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None) -> list[RequestOutput]:
        """One output per prompt, in order. Text prompts get ChatGLM's ``[gMASK] sop`` prefix."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            token_lists = [self.tokenizer.encode(p) for p in prompts]
        else:
            token_lists = [list(p) for p in prompt_token_ids]
        return self._run(token_lists, sampling_params, chat=False)

    def chat(self, messages: Sequence[ChatMessage | dict] | Sequence[Sequence[ChatMessage | dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """One conversation or a list of them; replies stop on ChatGLM3's chat stop tokens."""
        conversations = [messages] if messages and not isinstance(messages[0], (list, tuple)) else list(messages)
        token_lists = [build_chat_prompt(self.tokenizer, _as_messages(c)) for c in conversations]
        return self._run(token_lists, sampling_params, chat=True)

    def stats(self) -> dict:
        return self.engine.stats()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep theirs), e.g. between benchmark rounds."""
        self.engine.block_manager.reset_prefix_cache()

    def _run(self, token_lists: list[list[int]], sampling_params, chat: bool) -> list[RequestOutput]:
        params = _broadcast(sampling_params, len(token_lists))
        ids = []
        try:
            for tokens, p in zip(token_lists, params):
                request_id = f"offline-{next(self._ids)}"
                self.engine.add_request(request_id, tokens, p, chat=chat)
                ids.append(request_id)
        except Exception:
            for request_id in ids:   # leave nothing half-queued behind a bad request
                self.engine.abort_request(request_id)
            self.engine.step()
            raise
        results = {request_id: RequestOutput(request_id, tokens, [CompletionOutput(i) for i in range(p.n)], False)
                   for request_id, tokens, p in zip(ids, token_lists, params)}
        while self.engine.has_unfinished_requests():
            for delta in self.engine.step():
                merge_delta(results[delta.request_id], delta)
        return [results[i] for i in ids]


def merge_delta(total: RequestOutput, delta: RequestOutput) -> None:
    """Accumulate an engine delta into a request's running result."""
    for part in delta.outputs:
        out = total.outputs[part.index]
        out.text += part.text
        out.token_ids.extend(part.token_ids)
        if part.logprobs is not None:
            out.logprobs = (out.logprobs or []) + part.logprobs
            out.top_logprobs = (out.top_logprobs or []) + part.top_logprobs
        if part.finish_reason is not None:
            out.finish_reason, out.stop_reason = part.finish_reason, part.stop_reason
    total.num_cached_tokens = delta.num_cached_tokens
    total.metrics = delta.metrics
    total.finished = all(o.finished for o in total.outputs)


def build_engine(config: EngineConfig):
    if config.tensor_parallel_size > 1:
        from glmserve.engine.distributed.tp_engine import build_tensor_parallel_engine
        return build_tensor_parallel_engine(config)
    return Engine(config)


def _broadcast(sampling_params, count: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    params = list(sampling_params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling_params for {count} prompts")
    return params


def _as_messages(conversation) -> list[ChatMessage]:
    if all(isinstance(m, ChatMessage) for m in conversation):
        return list(conversation)
    return messages_from_json(list(conversation))
