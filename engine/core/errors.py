"""Errors a request can end with, so one place per frontend can map them to status codes.

They cross from the engine core's process to the frontend's pickled, so each one rebuilds from its arguments.
"""
from __future__ import annotations


class RequestError(ValueError):
    """A request the engine refuses (bad prompt, too long, unknown token id). ``field`` names the culprit."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message

    def __reduce__(self):
        return type(self), (self.field, self.message)


class DuplicateRequestError(ValueError):
    """A request id that is already in flight."""


class EngineDeadError(RuntimeError):
    """The engine core failed (its process died, or a step failed beyond recovery) and serves no more requests."""


class EngineStepError(RuntimeError):
    """A request failed because an engine step raised (the frontends map it to INTERNAL); the engine goes on."""


class QueueFullError(RuntimeError):
    """The waiting queue is at the server's ``max_waiting_requests``."""
