"""The HTTP API as one ASGI application: the call observer (API key, counting, in-flight tracking) around a
FastAPI app whose every error, its own included (a body that does not validate, an unknown route), has OpenAI's
error shape."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

from glmserve.engine.entrypoints.http.errors import ApiError
from glmserve.engine.entrypoints.http.observer import DEFAULT_MAX_BODY_BYTES, CallObserver
from glmserve.engine.entrypoints.http.routes import Routes, error_response
from glmserve.engine.entrypoints.metrics import ServerMetrics
from glmserve.engine.entrypoints.serving_state import ServingState

# Union members show up in validation error locations ("stop", "str"); they are not fields.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def build_app(state: ServingState, metrics: ServerMetrics, api_key: str | None,
              served_model_name: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> ASGIApp:
    api = FastAPI(title="glmserve", docs_url=None, redoc_url=None, openapi_url=None)
    api.include_router(Routes(state, served_model_name).router())
    api.add_exception_handler(RequestValidationError, _invalid_body)
    api.add_exception_handler(HTTPException, _http_error)
    return CallObserver(api, state, metrics, api_key, max_body_bytes)


async def _invalid_body(request: Request, exc: RequestValidationError):
    error = exc.errors()[0]
    if error.get("type") == "json_invalid":
        return error_response(ApiError(400, f"the body is not valid JSON: {error.get('ctx', {}).get('error', '')}"
                                            .rstrip(": ")))
    param = field_path(error.get("loc", ()))
    message = error.get("msg", "invalid value")
    if error.get("type") == "missing":
        message = "required"
    return error_response(ApiError(400, f"{param or 'body'}: {message}", param))


async def _http_error(request: Request, exc: HTTPException):
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return error_response(ApiError(exc.status_code, message.get(exc.status_code, str(exc.detail)),
                                   code="not_found" if exc.status_code == 404 else None))


def field_path(loc) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``messages[0].role``."""
    path = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part not in _TYPE_TAGS:
            path += f".{part}" if path else part
    return path or None
