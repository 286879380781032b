"""A frontend's handle on its engine core: send commands, receive events on a background thread.

Two kinds, one interface:

* ``ProcessEngineCore``: the engine core in a process of its own (what ``glmserve serve`` runs). The frontend's
  protocol work (protobuf, HTTP/2, JSON, metrics) and the engine's scheduling and model run on different cores
  instead of sharing one GIL. Commands and events travel over a multiprocessing pipe, pickled, one event per
  engine step. If the process dies, the pipe closes: the reader thread sees it at once and reports EngineFailed.
* ``InprocEngineCore``: the same loop on a thread of the caller's process, for embedding, tests and benchmarks
  that need the engine object at hand.
"""
from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
from abc import ABC, abstractmethod
from typing import Callable

from glmserve.engine.config.engine_config import EngineConfig
from glmserve.engine.runtime.core_loop import CoreLoop
from glmserve.engine.runtime.core_process import run_engine_core_process
from glmserve.engine.runtime.engine_core import EngineCore
from glmserve.engine.runtime.engine_info import EngineInfo, EngineStats
from glmserve.engine.runtime.messages import Command, EngineFailed, EngineReady, Event, Shutdown

log = logging.getLogger(__name__)

OnEvent = Callable[[Event], None]
# How long a stopping engine core gets to finish its step and exit before it is killed.
SHUTDOWN_GRACE_S = 10.0


class EngineStartError(RuntimeError):
    """The engine core process failed to start and sent no reason (it died while loading)."""


class EngineCoreClient(ABC):
    info: EngineInfo
    initial_stats: EngineStats      # the counters once the engine core is ready (after its warm-up)

    @abstractmethod
    def start(self, on_event: OnEvent) -> None:
        """Begin delivering events to ``on_event`` (called on a background thread, in order)."""

    @abstractmethod
    def send(self, command: Command) -> None:
        """Hand a command to the engine core (never blocks on a step)."""

    @abstractmethod
    def shutdown(self) -> None:
        """Stop the engine core and release it. Idempotent."""


class InprocEngineCore(EngineCoreClient):
    def __init__(self, core: EngineCore):
        self.core = core
        core.warm_up()
        self.info = core.info()
        self.initial_stats = core.stats()
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start(self, on_event: OnEvent) -> None:
        loop = CoreLoop(self.core, self._receive, on_event)
        self._thread = threading.Thread(target=loop.run, name="glmserve-engine-core", daemon=True)
        self._thread.start()

    def send(self, command: Command) -> None:
        self._commands.put(command)

    def _receive(self, timeout: float | None) -> list[Command]:
        try:
            commands = [self._commands.get(timeout=timeout) if timeout != 0.0 else self._commands.get_nowait()]
        except queue.Empty:
            return []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def shutdown(self) -> None:
        if self._thread is not None:
            self.send(Shutdown())
            self._thread.join(SHUTDOWN_GRACE_S)
            self._thread = None
        self.core.shutdown()


class ProcessEngineCore(EngineCoreClient):
    def __init__(self, config: EngineConfig, log_level: int | None = None, frontend_cpus: int = 1,
                 engine_cpus: frozenset[int] | None = None):
        """Start the engine core process (it loads the model and warms up); ``wait_ready`` waits for that.
        ``frontend_cpus``: CPU cores its torch threads leave to this process (core_process.py); ``engine_cpus``:
        the cores to bind it to instead, one torch thread each (cpu_placement.py)."""
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_end = ctx.Pipe(duplex=True)
        # Not a daemon: the engine core starts tensor-parallel workers of its own. It follows this process out
        # when the pipe closes, so it cannot outlive a frontend that died.
        self.process = ctx.Process(target=run_engine_core_process, name="glmserve-engine-core",
                                   args=(config, child_end, log_level if log_level is not None
                                         else logging.getLogger().getEffectiveLevel(), frontend_cpus,
                                         engine_cpus))
        self.process.start()
        child_end.close()   # the child holds the only other end: EOF here means the child is gone
        self._send_lock = threading.Lock()
        self._closing = False
        self._ready = False

    def wait_ready(self) -> ProcessEngineCore:
        """Block until the engine core is ready; raise why it is not (its start-up error, or its death)."""
        try:
            first = self._conn.recv()
        except (EOFError, OSError):
            self.process.join(SHUTDOWN_GRACE_S)
            raise EngineStartError(f"the engine core process exited with code {self.process.exitcode} "
                                   "while starting") from None
        if isinstance(first, EngineFailed):
            self.process.join(SHUTDOWN_GRACE_S)
            raise first.error if first.error is not None else EngineStartError(first.message)
        assert isinstance(first, EngineReady), first
        self.info, self.initial_stats = first.info, first.stats
        self._ready = True
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, on_event: OnEvent) -> None:
        threading.Thread(target=self._read, args=(on_event,), name="glmserve-engine-events", daemon=True).start()

    def _read(self, on_event: OnEvent) -> None:
        while True:
            try:
                event = self._conn.recv()
            except (EOFError, OSError):
                break
            on_event(event)
            if isinstance(event, EngineFailed):
                return
        if self._closing:
            return
        self.process.join(SHUTDOWN_GRACE_S)
        on_event(EngineFailed(f"the engine core process (pid {self.process.pid}) died with exit code "
                              f"{self.process.exitcode}"))

    def send(self, command: Command) -> None:
        with self._send_lock:
            try:
                self._conn.send(command)
            except OSError:
                pass   # the process is gone: the reader thread reports it

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._ready:      # still loading: nothing to finish, and it would not read the command yet
            self.process.kill()
        self.send(Shutdown())
        self.process.join(SHUTDOWN_GRACE_S)
        if self.process.is_alive():
            log.warning("the engine core process did not stop within %ss: killing it", SHUTDOWN_GRACE_S)
            self.process.kill()
            self.process.join()
        self._conn.close()
