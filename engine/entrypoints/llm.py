"""The offline API, shaped like vLLM's: ``LLM(model).generate(prompts, sampling_params)``.

    from glmserve.engine.entrypoints.llm import LLM, SamplingParams
    llm = LLM("glm-tiny", max_num_seqs=64)
    print(llm.generate("Hello", SamplingParams(max_tokens=16, temperature=0))[0].outputs[0].text)

The engine core runs in this process and thread; ``LLM(...)`` takes every engine option by name (the same options
as the ``glmserve`` CLI flags: engine/config/options.py).
"""
from __future__ import annotations

import itertools
from typing import Sequence

from glmserve.engine.config.options import build_engine_config
from glmserve.engine.core.outputs import RequestOutput
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.entrypoints.chat import ChatTemplate
from glmserve.engine.runtime.engine_core import EngineCore
from glmserve.engine.lora.manager import AdapterInfo
from glmserve.engine.runtime.engine_info import EngineStats
from glmserve.engine.structured.tool_call_grammar import ToolChoice
from glmserve.engine.text.chat_format import ChatMessage, messages_from_json

__all__ = ["LLM", "SamplingParams"]


class LLM:
    def __init__(self, model: str, **options):
        """``options``: engine options by name (dtype, max_num_seqs, num_kv_blocks, attention_backend, ...)."""
        self.engine = EngineCore(build_engine_config(model=model, **options))
        self.tokenizer = self.engine.tokenizer
        self.chat_template = ChatTemplate(self.tokenizer)
        self._ids = itertools.count()

    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None,
                 adapter: str | Sequence[str | None] | None = None) -> list[RequestOutput]:
        """One output per prompt, in order. Text prompts get ChatGLM's ``[gMASK] sop`` prefix. ``adapter``: a loaded
        fine-tune (``load_adapter``, or the ``lora_adapters`` / ``ptuning_prefixes`` options) for every prompt, or one
        per prompt (None: the base model)."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts or prompt_token_ids")
        if prompts is not None:
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            token_lists = [self.tokenizer.encode(p) for p in prompts]
        else:
            token_lists = [list(p) for p in prompt_token_ids]
        adapters = _broadcast_adapter(adapter, len(token_lists))
        return self._run(token_lists, _broadcast(sampling_params, len(token_lists)), adapters)

    def chat(self, messages: Sequence[ChatMessage | dict] | Sequence[Sequence[ChatMessage | dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             tools: list | dict | None = None, tool_choice: str | ToolChoice = "auto") -> list[RequestOutput]:
        """One conversation or a list of them (``tools`` shown to the model on the first system message). Replies
        stop on ChatGLM3's chat stop tokens; a reply that is a tool call comes back with finish_reason
        "tool_call" and its ``tool_call`` parsed. ``tool_choice`` "required" (or ``ToolChoice.named(name)``)
        constrains each reply to a tool call whose arguments are valid for the tool."""
        conversations = [messages] if messages and not isinstance(messages[0], (list, tuple)) else list(messages)
        token_lists = [self.chat_template.prompt(_as_messages(c), tools) for c in conversations]
        choice = ToolChoice(tool_choice) if isinstance(tool_choice, str) else tool_choice
        params = [self.chat_template.sampling_params(p, tools, choice)
                  for p in _broadcast(sampling_params, len(token_lists))]
        results = self._run(token_lists, params)
        for result in results:
            for sample in result.outputs:
                self.chat_template.finish(sample, result.request_id)
        return results

    def load_adapter(self, name: str, path: str) -> AdapterInfo:
        """Load a LoRA adapter (PEFT folder) or a P-tuning v2 checkpoint under ``name``."""
        return self.engine.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep theirs), e.g. between benchmark rounds."""
        self.engine.block_manager.reset_prefix_cache()

    def _run(self, token_lists: list[list[int]], params: list[SamplingParams],
             adapters: list[str | None] | None = None) -> list[RequestOutput]:
        ids = []
        try:
            for tokens, p, adapter in zip(token_lists, params, adapters or [None] * len(token_lists)):
                request_id = f"offline-{next(self._ids)}"
                self.engine.add_request(request_id, tokens, p, adapter=adapter)
                ids.append(request_id)
        except Exception:
            for request_id in ids:   # leave nothing half-queued behind a bad request
                self.engine.abort_request(request_id)
            for _ in self.engine.step_until_idle():
                pass
            raise
        results = {request_id: RequestOutput.empty(request_id, tokens, p.n)
                   for request_id, tokens, p in zip(ids, token_lists, params)}
        for delta in self.engine.step_until_idle():
            results[delta.request_id].merge(delta)
        return [results[i] for i in ids]


def _broadcast(sampling_params, count: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams() for _ in range(count)]
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * count
    params = list(sampling_params)
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling_params for {count} prompts")
    return params


def _broadcast_adapter(adapter, count: int) -> list[str | None]:
    if adapter is None or isinstance(adapter, str):
        return [adapter] * count
    adapters = list(adapter)
    if len(adapters) != count:
        raise ValueError(f"got {len(adapters)} adapters for {count} prompts")
    return adapters


def _as_messages(conversation) -> list[ChatMessage]:
    if all(isinstance(m, ChatMessage) for m in conversation):
        return list(conversation)
    return messages_from_json(list(conversation))
