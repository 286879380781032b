"""The engine core's loop: take commands, step while there is work, report each step. The same loop runs on a
thread of the frontend's process (InprocEngineCore) and in a process of its own (core_process.py); only how
commands arrive and events leave differs."""
from __future__ import annotations

import logging
import time
from typing import Callable

from glmserve.engine.runtime.engine_core import EngineCore
from glmserve.engine.runtime.messages import (AbortRequest, AdapterCallDone, AddRequest, Command, EngineFailed, Event,
                                              LoadAdapter, RequestFailed, Shutdown, StepDone, StepFailed,
                                              UnloadAdapter)

log = logging.getLogger(__name__)

# receive(timeout): the commands that arrived, waiting up to ``timeout`` seconds for the first (None: until one
# does); an empty list when none came. emit(event): hand an event to the frontend.
Receive = Callable[[float | None], list[Command]]
Emit = Callable[[Event], None]


class CoreLoop:
    def __init__(self, core: EngineCore, receive: Receive, emit: Emit):
        self.core = core
        self._receive = receive
        self._emit = emit
        self.adds_applied = 0

    def run(self) -> None:
        """Until a Shutdown command, or until the engine core cannot go on (after emitting EngineFailed)."""
        core = self.core
        while True:
            # Idle: sleep until a command comes. Busy: take what has come and step again at once.
            for command in self._receive(0.0 if core.has_unfinished_requests() else None):
                if isinstance(command, Shutdown):
                    return
                self._apply(command)
            if not core.has_unfinished_requests():
                continue
            try:
                outputs = core.step()
            except Exception as exc:  # noqa: BLE001 - a failed step must not take the server down
                log.exception("engine step failed")
                if not self._recover(exc):
                    return
                continue
            self._emit(StepDone(outputs, core.stats(), core.last_step_num_tokens, time.monotonic(),
                                self.adds_applied))

    def _apply(self, command: Command) -> None:
        if isinstance(command, AbortRequest):
            self.core.abort_request(command.request_id)
            return
        if isinstance(command, (LoadAdapter, UnloadAdapter)):
            self._adapter_call(command)
            return
        assert isinstance(command, AddRequest)
        self.adds_applied += 1
        try:
            self.core.add_request(command.request_id, command.prompt_token_ids, command.params,
                                  priority=command.priority, arrival_time=command.arrival_time,
                                  adapter=command.adapter)
        except Exception as exc:  # noqa: BLE001 - checked by the frontend already: this fails one request only
            self._emit(RequestFailed(command.request_id, exc, self.adds_applied))

    def _adapter_call(self, command: LoadAdapter | UnloadAdapter) -> None:
        """Between two steps: a failed load or a refused unload changes nothing and fails only this call."""
        info, error = None, None
        try:
            if isinstance(command, LoadAdapter):
                info = self.core.load_adapter(command.name, command.path, command.kind)
            else:
                self.core.unload_adapter(command.name)
        except Exception as exc:  # noqa: BLE001 - the caller gets it (mapped to a status); the engine goes on
            error = exc
        self._emit(AdapterCallDone(command.call_id, info, error, tuple(self.core.adapters.list()), self.adds_applied,
                                   self.core.stats()))

    def _recover(self, exc: Exception) -> bool:
        """Abort every request in flight and free their blocks; False when even that fails (the engine is dead)."""
        request_ids = self.core.in_flight_request_ids()
        message = f"engine step failed: {type(exc).__name__}: {exc}"
        try:
            for request_id in request_ids:
                self.core.abort_request(request_id)
            list(self.core.step_until_idle())    # the abort deltas, which nobody will read
        except Exception as fatal:  # noqa: BLE001
            log.exception("the engine cannot recover from a failed step")
            self._emit(EngineFailed(f"{message}; cleaning up failed too: {type(fatal).__name__}: {fatal}",
                                    failed_step=StepFailed(request_ids, message, self.adds_applied)))
            return False
        self._emit(StepFailed(request_ids, message, self.adds_applied, self.core.stats()))
        return True
