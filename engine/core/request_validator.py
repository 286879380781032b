"""What a request is checked against before it is queued: limits fixed when the engine starts.

Frontends check a request in their own thread or process (bad input fails at once, naming the field, without a
round trip to the engine core); the engine core checks again when it takes the request.
"""
from __future__ import annotations

from dataclasses import dataclass

from glmserve.engine.core.errors import RequestError
from glmserve.engine.core.sampling_params import SamplingParams


@dataclass(frozen=True)
class RequestLimits:
    vocab_size: int
    max_model_len: int
    num_kv_blocks: int
    block_size: int


def validate_request(prompt_token_ids, params: SamplingParams,
                     limits: RequestLimits) -> tuple[list[int], SamplingParams]:
    """The prompt and the params the request will run with (``max_tokens`` None becomes the room left in the
    context). Raises RequestError / SamplingParamsError (both ValueError) naming the field."""
    prompt = [int(t) for t in prompt_token_ids]
    if not prompt:
        raise RequestError("prompt", "the prompt is empty")
    bad = next((t for t in prompt if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise RequestError("prompt_token_ids", f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
    if len(prompt) >= limits.max_model_len:
        raise RequestError("prompt", f"the prompt has {len(prompt)} tokens; max_model_len is {limits.max_model_len} "
                           "and at least one token must be generated")
    params.validate(vocab_size=limits.vocab_size, max_model_len=limits.max_model_len, prompt_len=len(prompt))
    if params.max_tokens is None:
        params = params.clone(max_tokens=limits.max_model_len - len(prompt))
    total = len(prompt) + params.max_tokens
    needed = -(-total // limits.block_size)
    if needed > limits.num_kv_blocks:
        raise RequestError("max_tokens", f"the request needs {needed} KV blocks for prompt + max_tokens = {total} "
                           f"tokens, but the cache has {limits.num_kv_blocks}")
    return prompt, params
