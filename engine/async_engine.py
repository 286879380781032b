"""The engine behind a server: a background thread steps the engine, each request streams its deltas.

Engine calls are serialised by one lock: the loop thread holds it during a step, callers hold it briefly to add
or abort a request, so validation errors reach the caller directly. Deltas cross to the caller's event loop
through ``call_soon_threadsafe``.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from .engine import Engine
from .errors import EngineDeadError
from .outputs import RequestOutput
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)

StepListener = Callable[[Engine, list[RequestOutput]], None]


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_waiting_requests``."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting_requests: int | None = None):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.step_listeners: list[StepListener] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._streams: dict[str, _Stream] = {}
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="glmserve-engine", daemon=True)
        self._thread.start()

    # ---- public API -------------------------------------------------------------------------------------------
    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                       chat: bool = False, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Stream the request's deltas; the last one has ``finished`` set. Leaving the iteration early (client
        cancel, deadline) aborts the request and frees its blocks at once."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._add(request_id, prompt_token_ids, params, chat, priority, stream)
        return self._iterate(request_id, stream, params.n)

    def abort(self, request_id: str) -> bool:
        with self._lock:
            found = self.engine.abort_request(request_id)
        self._wake.set()
        return found

    def stats(self) -> dict:
        with self._lock:
            return self.engine.stats()

    def is_in_flight(self, request_id: str) -> bool:
        return request_id in self._streams

    def run_warmup(self, params: SamplingParams | None = None) -> None:
        """One short request through the whole path, before the server reports SERVING."""
        with self._lock:
            self.engine.add_request("__warmup__", self.engine.tokenizer.encode("warm up"),
                                    params or SamplingParams(max_tokens=2, temperature=0.0))
            while self.engine.has_unfinished_requests():
                self.engine.step()

    async def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)

    # ---- internals --------------------------------------------------------------------------------------------
    def _add(self, request_id, prompt_token_ids, params, chat, priority, stream) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine has failed: {self._dead}")
        with self._lock:
            if self.max_waiting_requests is not None and self.engine.scheduler.num_waiting >= self.max_waiting_requests:
                raise QueueFullError(f"the waiting queue is full ({self.max_waiting_requests} requests)")
            self.engine.add_request(request_id, prompt_token_ids, params, chat=chat, priority=priority)
            self._streams[request_id] = stream
        self._wake.set()

    async def _iterate(self, request_id: str, stream: _Stream, num_samples: int) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                num_samples -= item.finished   # with n > 1 each sample's delta says when that sample is done
                finished = num_samples == 0
                yield item
        finally:
            if not finished:
                self.abort(request_id)
            self._streams.pop(request_id, None)

    def _loop(self) -> None:
        while not self._stop:
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            while not self._stop:
                with self._lock:
                    if not self.engine.has_unfinished_requests():
                        break
                    try:
                        outputs = self.engine.step()
                    except Exception as exc:  # noqa: BLE001 - an engine fault must not take the server down
                        log.exception("engine step failed")
                        self._fail_all(exc)
                        continue
                    for listener in self.step_listeners:
                        listener(self.engine, outputs)
                self._dispatch(outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)

    def _fail_all(self, exc: Exception) -> None:
        """Fail every in-flight request with the fault and free their blocks; if even that fails, the engine
        is dead (health reports NOT_SERVING)."""
        error = EngineStepError(f"engine step failed: {type(exc).__name__}: {exc}")
        try:
            for request_id in list(self.engine.scheduler.requests):
                self.engine.abort_request(request_id.split("#")[0])
            self.engine.step()  # emits the abort deltas, which nobody will read
        except Exception as fatal:  # noqa: BLE001
            self._dead = fatal
            self._stop = True
        for request_id in list(self._streams):
            stream = self._streams.pop(request_id)
            stream.put(error)


class EngineStepError(RuntimeError):
    """A request failed because an engine step raised (the server maps it to INTERNAL)."""
