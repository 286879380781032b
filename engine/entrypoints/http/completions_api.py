"""``POST /v1/completions``: plain text completion of one or more prompts.

``prompt`` is a string, a list of strings, a list of token ids, or a list of such lists. A string is encoded as
the gRPC API's Generate encodes it (``[gMASK] sop`` first); token ids are taken as they are. Each prompt is one
engine request with ``n`` samples; choice ``i * n + j`` is sample ``j`` of prompt ``i``. A structured-output
constraint (``response_format``, vLLM's ``structured_outputs``) covers the whole completion of each sample.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from glmserve.engine.core.outputs import CompletionOutput
from glmserve.engine.entrypoints.http.errors import bad_request
from glmserve.engine.entrypoints.http.generation import ChoiceDelta, EnginePrompt, Generation
from glmserve.engine.entrypoints.http.logprobs import TokenText, completion_logprobs
from glmserve.engine.entrypoints.http.protocol import CompletionRequest
from glmserve.engine.entrypoints.http.sampling import include_usage, sampling_params
from glmserve.engine.entrypoints.http.streaming import answer_events, sse
from glmserve.engine.entrypoints.http.structured import field_names as structured_field_names
from glmserve.engine.entrypoints.serving_state import ServingState
from glmserve.engine.text.tokenizer import ChatGLMTokenizer

PROMPT_SHAPES = "a string, a list of strings, a list of token ids, or a list of lists of token ids"


# ---- request in ---------------------------------------------------------------------------------------------------
def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def prompt_token_ids(prompt: Any, tokenizer: ChatGLMTokenizer) -> list[tuple[str, list[int]]]:
    """(name in the request, token ids) of each prompt."""
    def text(value: str, name: str) -> tuple[str, list[int]]:
        if not value:
            raise bad_request(name, f"{name}: the prompt is empty")
        return name, tokenizer.encode(value)

    def ids(value: list, name: str) -> tuple[str, list[int]]:
        if not value:
            raise bad_request(name, f"{name}: the prompt is empty")
        bad = next((i for i, v in enumerate(value) if not _is_token_id(v)), None)
        if bad is not None:
            raise bad_request(name, f"{name}[{bad}]: a token id must be an integer, got {value[bad]!r}")
        return name, list(value)

    if isinstance(prompt, str):
        return [text(prompt, "prompt")]
    if not isinstance(prompt, list) or not prompt:
        raise bad_request("prompt", f"prompt: must be {PROMPT_SHAPES}")
    if all(isinstance(p, str) for p in prompt):
        return [text(p, f"prompt[{i}]") if len(prompt) > 1 else text(p, "prompt") for i, p in enumerate(prompt)]
    if all(_is_token_id(p) for p in prompt):
        return [ids(prompt, "prompt")]
    if all(isinstance(p, list) for p in prompt):
        return [ids(p, f"prompt[{i}]") if len(prompt) > 1 else ids(p, "prompt") for i, p in enumerate(prompt)]
    raise bad_request("prompt", f"prompt: must be {PROMPT_SHAPES}, not a mix")


@dataclass
class CompletionCall:
    generation: Generation
    response_id: str
    model: str
    token_text: TokenText
    logprobs: bool
    include_usage: bool
    return_token_ids: bool
    created: int = field(default_factory=lambda: int(time.time()))


def completion_call(body: CompletionRequest, state: ServingState, request_id: str, model: str,
                    token_text: TokenText, adapter: str | None = None) -> CompletionCall:
    if body.echo:
        raise bad_request("echo", "echo: returning the prompt with the completion is not supported")
    if body.suffix is not None:
        raise bad_request("suffix", "suffix: insertion (text after the completion) is not supported")
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise bad_request("best_of", "best_of: only best_of = n is supported (every sample is returned)")
    params = sampling_params(body, body.max_tokens, body.logprobs)
    prompts = prompt_token_ids(body.prompt, state.engine.tokenizer)
    engine_prompts = [EnginePrompt(request_id if len(prompts) == 1 else f"{request_id}-{i}", ids, name)
                      for i, (name, ids) in enumerate(prompts)]
    generation = Generation(state.engine, engine_prompts, params, body.priority or 0, adapter)
    return CompletionCall(generation, f"cmpl-{request_id}", model, token_text, body.logprobs is not None,
                          include_usage(body), bool(body.return_token_ids))


def field_names(body: CompletionRequest) -> dict[str, str]:
    """The engine's field names as this request spells them, for error messages."""
    return {"prompt_token_ids": "prompt", **structured_field_names(body)}


# ---- answer out ---------------------------------------------------------------------------------------------------
def _choice(call: CompletionCall, index: int, sample: CompletionOutput, finish: str | None,
            offsets: dict[int, int]) -> dict:
    logprobs = None
    if call.logprobs and sample.logprobs is not None:
        logprobs, offsets[index] = completion_logprobs(call.token_text, sample.token_ids, sample.logprobs,
                                                       sample.top_logprobs or [], offsets.get(index, 0))
    choice = {"index": index, "text": sample.text, "logprobs": logprobs, "finish_reason": finish}
    if call.return_token_ids:
        choice["token_ids"] = sample.token_ids
    return choice


async def complete(call: CompletionCall) -> dict:
    async for _ in call.generation.choices():
        pass
    choices = [_choice(call, i, result, result.finish_reason, {}) for i, result in
               enumerate(call.generation.results())]
    return {"id": call.response_id, "object": "text_completion", "created": call.created, "model": call.model,
            "choices": choices, "usage": call.generation.usage().to_json()}


async def stream(call: CompletionCall) -> AsyncIterator[bytes]:
    base = {"id": call.response_id, "object": "text_completion", "created": call.created, "model": call.model}
    if call.include_usage:
        base["usage"] = None
    offsets: dict[int, int] = {}

    async def choices() -> AsyncIterator[bytes]:
        async for batch in call.generation.choices():
            for d in batch:
                if _worth_sending(call, d):
                    finish = d.result.finish_reason if d.result is not None else None
                    yield sse({**base, "choices": [_choice(call, d.index, d.delta, finish, offsets)]})
    def usage() -> dict:
        return {**base, "choices": [], "usage": call.generation.usage().to_json()}
    async for event in answer_events(choices(), usage if call.include_usage else None):
        yield event


def _worth_sending(call: CompletionCall, d: ChoiceDelta) -> bool:
    return bool(d.delta.text or d.result is not None or (d.delta.token_ids and (call.logprobs
                                                                                or call.return_token_ids)))
