"""The one exception -> status mapping: every error a request can end with, and a bug is never the client's fault."""
from __future__ import annotations

import grpc
import pytest

from glmserve.engine.runtime.async_engine import EngineStepError, QueueFullError
from glmserve.engine.text.chat_format import ChatFormatError
from glmserve.engine.core.errors import DuplicateRequestError, EngineDeadError, RequestError
from glmserve.engine.entrypoints.grpc.errors import ServiceUnavailable, status_for
from glmserve.engine.core.sampling_params import SamplingParamsError

S = grpc.StatusCode


@pytest.mark.parametrize("exc, code", [
    (RequestError("prompt", "the prompt is empty"), S.INVALID_ARGUMENT),
    (SamplingParamsError("top_p", "top_p must be in (0, 1]"), S.INVALID_ARGUMENT),
    (ChatFormatError("unknown chat role 'x'"), S.INVALID_ARGUMENT),
    (DuplicateRequestError("request id 'a' is already in flight"), S.ALREADY_EXISTS),
    (QueueFullError("the waiting queue is full"), S.RESOURCE_EXHAUSTED),
    (ServiceUnavailable("draining"), S.UNAVAILABLE),
    (EngineDeadError("dead"), S.UNAVAILABLE),
    (TimeoutError(), S.DEADLINE_EXCEEDED),
    (EngineStepError("engine step failed: boom"), S.INTERNAL),
    (ValueError("a bug somewhere"), S.INTERNAL),
    (KeyError("x"), S.INTERNAL),
])
def test_status_for(exc, code):
    got, message = status_for(exc)
    assert got == code and message


def test_invalid_argument_messages_name_the_field():
    assert "prompt" in status_for(RequestError("prompt", "is empty"))[1]
