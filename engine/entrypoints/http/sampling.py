"""The sampling parameters of an OpenAI request, as the engine's ``SamplingParams``.

Only the fields the client set are copied, so the others keep the engine's defaults (vLLM's). The values are
range-checked by the engine when the request is submitted; its errors name the engine's field, which
``field_names`` maps back to the request's where they differ. A structured-output constraint, in any of its
spellings, becomes the engine's ``structured`` (structured.py).
"""
from __future__ import annotations

from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.entrypoints.http.errors import bad_request
from glmserve.engine.entrypoints.http.protocol import SamplingFields
from glmserve.engine.entrypoints.http.structured import structured_output

# Copied as they are when set (the same name in the request and in SamplingParams).
_PASSED_THROUGH = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed", "min_tokens", "ignore_eos")


def sampling_params(body: SamplingFields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    if body.logit_bias:
        raise bad_request("logit_bias", "logit_bias is not supported")
    kwargs = {name: getattr(body, name) for name in _PASSED_THROUGH if getattr(body, name) is not None}
    stop = body.stop
    if stop is not None:
        kwargs["stop"] = [stop] if isinstance(stop, str) else stop
    if body.stop_token_ids is not None:
        kwargs["stop_token_ids"] = body.stop_token_ids
    return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, structured=structured_output(body), **kwargs)


def include_usage(body: SamplingFields) -> bool:
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options", "stream_options: only allowed with stream: true")
    return bool(body.stream_options and body.stream_options.include_usage)
