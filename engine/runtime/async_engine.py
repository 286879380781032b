"""The engine behind a server: a background thread steps the engine, each request streams its deltas.

Only the engine thread touches the engine's queues and KV blocks. Callers validate a request in their own
thread (so bad input fails at once, naming the field) and hand adds and aborts to the engine thread through a
command queue: an event loop never waits for a model step. Deltas cross back to the caller's event loop through
``call_soon_threadsafe``.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from glmserve.engine.runtime.engine_core import Engine
from glmserve.engine.core.errors import DuplicateRequestError, EngineDeadError
from glmserve.engine.core.outputs import RequestOutput
from glmserve.engine.core.sampling_params import SamplingParams

log = logging.getLogger(__name__)

StepListener = Callable[[Engine, list[RequestOutput]], None]


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_waiting_requests``."""


class EngineStepError(RuntimeError):
    """A request failed because an engine step raised (the server maps it to INTERNAL)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item: RequestOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    chat: bool
    priority: int


@dataclass
class _Abort:
    request_id: str


class AsyncEngine:
    def __init__(self, engine: Engine, max_waiting_requests: int | None = None):
        self.engine = engine
        self.max_waiting_requests = max_waiting_requests
        self.step_listeners: list[StepListener] = []
        self._commands: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        # Adds handed over but not yet in the scheduler's queue = sent - applied; each counter has one writer
        # thread (callers' event loop / the engine thread), so neither needs a lock.
        self._adds_sent = 0
        self._adds_applied = 0
        self._step_lock = threading.Lock()  # held by whoever steps the engine (the loop, or a warm-up)
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
        """Stream the request's deltas; the last one of each sample has ``finished`` set. Leaving the iteration
        early (client cancel, deadline) aborts the request and frees its blocks at once.

        Raises at once (before any output) for invalid input, a duplicate in-flight id, a full waiting queue or
        a dead engine.
        """
        if self._dead is not None:
            raise EngineDeadError(f"the engine has failed: {self._dead}")
        if request_id in self._streams:
            raise DuplicateRequestError(f"request id {request_id!r} is already in flight")
        if self.max_waiting_requests is not None and self.num_waiting >= self.max_waiting_requests:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting_requests} requests)")
        prompt, effective = self.engine.validate_request(prompt_token_ids, params, chat=chat)
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        self._adds_sent += 1
        self._commands.put(_Add(request_id, prompt, params, chat, priority))
        self._wake.set()
        return self._iterate(request_id, stream, effective.n)

    def abort(self, request_id: str) -> bool:
        """Abort an in-flight request (its blocks are freed before the next step). False if unknown."""
        found = request_id in self._streams
        self._commands.put(_Abort(request_id))
        self._wake.set()
        return found

    @property
    def num_waiting(self) -> int:
        return self.engine.scheduler.num_waiting + self._num_pending_adds

    @property
    def _num_pending_adds(self) -> int:
        return self._adds_sent - self._adds_applied

    def stats(self) -> dict:
        """The engine's counters, read without waiting for a step (each value is current to within one step)."""
        stats = self.engine.stats()
        stats["num_waiting"] += self._num_pending_adds
        return stats

    def run_warmup(self, params: SamplingParams | None = None) -> None:
        """One short request through the whole path, before the server reports SERVING."""
        with self._step_lock:
            self.engine.add_request("__warmup__", self.engine.tokenizer.encode("warm up"),
                                    params or SamplingParams(max_tokens=2, temperature=0.0))
            while self.engine.has_unfinished_requests():
                self.engine.step()

    async def shutdown(self) -> None:
        """Stop the engine thread, then release what the engine holds beyond itself (tensor-parallel workers)."""
        self._stop = True
        self._wake.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10.0)
        self.engine.shutdown()

    # ---- the caller's side ------------------------------------------------------------------------------------
    async def _iterate(self, request_id: str, stream: _Stream, num_samples: int) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                for item in _coalesce(await _drain(stream.queue)):
                    if isinstance(item, BaseException):
                        raise item
                    num_samples -= sum(o.finished for o in item.outputs)
                    finished = num_samples == 0
                    yield item
        finally:
            if not finished:
                self.abort(request_id)
            self._streams.pop(request_id, None)

    # ---- the engine thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop:
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            while not self._stop:
                with self._step_lock:
                    self._apply_commands()
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

    def _apply_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Abort):
                self.engine.abort_request(command.request_id)
                continue
            self._adds_applied += 1
            stream = self._streams.get(command.request_id)
            if stream is None:      # the caller left before the request reached the engine
                continue
            try:
                self.engine.add_request(command.request_id, command.prompt_token_ids, command.params,
                                        chat=command.chat, priority=command.priority)
            except Exception as exc:  # noqa: BLE001 - validated already; anything else fails this request only
                stream.put(exc)

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


async def _drain(q: asyncio.Queue) -> list:
    """Wait for one item, then take whatever else is already queued."""
    items = [await q.get()]
    while not q.empty():
        items.append(q.get_nowait())
    return items


def _coalesce(items: list) -> list:
    """Merge consecutive deltas of the same sample, so a reader that fell behind gets one message per sample
    instead of one per token (an error stays in place)."""
    merged: list = []
    for item in items:
        prev = merged[-1] if merged else None
        if (isinstance(item, RequestOutput) and isinstance(prev, RequestOutput) and len(item.outputs) == 1
                and len(prev.outputs) == 1 and prev.outputs[0].index == item.outputs[0].index
                and not prev.outputs[0].finished):
            merged[-1] = _merge(prev, item)
        else:
            merged.append(item)
    return merged


def _merge(first: RequestOutput, second: RequestOutput) -> RequestOutput:
    a, b = first.outputs[0], second.outputs[0]
    out = type(a)(index=a.index, text=a.text + b.text, token_ids=a.token_ids + b.token_ids,
                  finish_reason=b.finish_reason, stop_reason=b.stop_reason,
                  logprobs=None if a.logprobs is None else a.logprobs + (b.logprobs or []),
                  top_logprobs=None if a.top_logprobs is None else a.top_logprobs + (b.top_logprobs or []))
    return RequestOutput(second.request_id, second.prompt_token_ids, [out], second.finished,
                         second.num_cached_tokens, second.metrics)
