"""The one place that maps what an HTTP call can fail with to a status code and OpenAI's error body::

    {"error": {"message": "...", "type": "...", "param": "field" | null, "code": "..." | null}}

Handlers raise plain exceptions (the engine's own, ``ServiceUnavailable``, or :class:`ApiError` for what only
the HTTP API knows of); :func:`error_for` turns them into a status and a body. OpenAI's clients pick their
exception class from the status (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429
RateLimitError, 5xx InternalServerError). An error nobody expected is a 500, never a 400: a bug in the server is
not the client's fault.
"""
from __future__ import annotations

from dataclasses import dataclass

from glmserve.engine.core.adapters import (AdapterCapacityError, AdapterExistsError, AdapterInUseError,
                                           AdapterLoadError, UnknownAdapterError)
from glmserve.engine.core.errors import (DuplicateRequestError, EngineDeadError, EngineStepError, QueueFullError,
                                         RequestError)
from glmserve.engine.core.sampling_params import SamplingParamsError
from glmserve.engine.entrypoints.serving_state import ServiceUnavailable
from glmserve.engine.text.chat_format import ChatFormatError
from glmserve.engine.text.tokenizer import TokenizerError

INVALID_REQUEST = "invalid_request_error"


@dataclass
class ApiError(Exception):
    """An error the HTTP API itself raises, with everything its response carries."""

    status: int
    message: str
    param: str | None = None
    type: str = INVALID_REQUEST
    code: str | None = None

    def __str__(self) -> str:
        return self.message


def bad_request(param: str | None, message: str) -> ApiError:
    """A 400 naming the field (``message`` should name it too: many clients show only the message)."""
    return ApiError(400, message, param)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_for(exc: BaseException, field_names: dict[str, str] | None = None) -> ApiError:
    """The status and body for ``exc``. ``field_names`` maps the engine's field names to the request's (for
    example ``logprobs`` to ``top_logprobs`` in a chat), so the error names what the client sent."""
    if isinstance(exc, ApiError):
        return exc
    names = field_names or {}
    if isinstance(exc, (RequestError, SamplingParamsError)):
        engine_field = exc.field
        param = names.get(engine_field, engine_field)
        message = str(exc)
        if param != engine_field:
            message = message.replace(engine_field, param, 1)
        return ApiError(400, message, param)
    if isinstance(exc, (ChatFormatError, TokenizerError)):
        return ApiError(400, str(exc), names.get("messages"))
    if isinstance(exc, UnknownAdapterError):   # also a fine-tune unloaded between the model check and the submit
        return ApiError(404, str(exc), names.get("adapter", "model"), code="model_not_found")
    if isinstance(exc, AdapterLoadError):      # the message names the file and the tensor at fault
        return ApiError(400, str(exc), names.get("adapter_path"))
    if isinstance(exc, AdapterExistsError):
        return ApiError(400, str(exc), names.get("adapter"), code="adapter_exists")
    if isinstance(exc, AdapterInUseError):
        return ApiError(409, str(exc), names.get("adapter"), code="adapter_in_use")
    if isinstance(exc, AdapterCapacityError):
        return ApiError(429, str(exc), None, "rate_limit_error", "adapter_capacity")
    if isinstance(exc, DuplicateRequestError):
        return ApiError(409, str(exc), None, INVALID_REQUEST, "duplicate_request_id")
    if isinstance(exc, QueueFullError):
        return ApiError(429, f"{exc}; retry later", None, "rate_limit_error", "rate_limit_exceeded")
    if isinstance(exc, (ServiceUnavailable, EngineDeadError)):
        return ApiError(503, str(exc), None, "service_unavailable", "service_unavailable")
    if isinstance(exc, EngineStepError):
        return ApiError(500, str(exc), None, "server_error", "internal_error")
    return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, "server_error", "internal_error")
