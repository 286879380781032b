"""Errors a request can end with, so one place (the server) can map them to status codes."""
from __future__ import annotations


class RequestError(ValueError):
    """A request the engine refuses (bad prompt, too long, unknown token id). ``field`` names the culprit."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


class DuplicateRequestError(ValueError):
    """A request id that is already in flight."""


class EngineDeadError(RuntimeError):
    """The engine loop failed and cannot serve any more requests."""
