"""The one place that maps what a request can fail with to a gRPC status code and message.

Handlers raise plain exceptions (the engine's own, or :class:`ServiceUnavailable`); the servicer's wrapper turns
them into a status with :func:`status_for`. An error nobody expected becomes INTERNAL, never INVALID_ARGUMENT:
a bug in the server is not the client's fault.
"""
from __future__ import annotations

import asyncio

import grpc

from glmserve.engine.core.adapters import (AdapterCapacityError, AdapterExistsError, AdapterInUseError,
                                           AdapterLoadError, UnknownAdapterError)
from glmserve.engine.core.errors import (DuplicateRequestError, EngineDeadError, EngineStepError, QueueFullError,
                                         RequestError)
from glmserve.engine.entrypoints.serving_state import ServiceUnavailable
from glmserve.engine.text.chat_format import ChatFormatError
from glmserve.engine.core.sampling_params import SamplingParamsError
from glmserve.engine.text.tokenizer import TokenizerError

# Errors that describe a bad request; their messages name the offending field.
_INVALID = (RequestError, SamplingParamsError, ChatFormatError, TokenizerError, AdapterLoadError)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, (DuplicateRequestError, AdapterExistsError)):
        return grpc.StatusCode.ALREADY_EXISTS, str(exc)
    if isinstance(exc, UnknownAdapterError):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, AdapterInUseError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, AdapterCapacityError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, _INVALID):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, (ServiceUnavailable, EngineDeadError)):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed; it was aborted"
    if isinstance(exc, EngineStepError):
        return grpc.StatusCode.INTERNAL, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
