"""The engine as frontends see it: ``generate`` streams a request's deltas, ``abort`` stops one, ``stats`` reads the
counters. Behind it an engine core runs in its own process (or on a thread: core_client.py).

Frontends check a request here, in their own thread (bad input fails at once, naming the field), then hand it to
the engine core as a command; an event loop never waits for a model step. Each engine step comes back as one
event holding every request's delta; they reach the callers' event loops with one ``call_soon_threadsafe`` per
loop and step.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import AsyncIterator, Callable

from glmserve.engine.core.errors import DuplicateRequestError, EngineDeadError, EngineStepError, QueueFullError
from glmserve.engine.core.outputs import RequestOutput
from glmserve.engine.core.request_validator import validate_request
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.runtime.core_client import EngineCoreClient
from glmserve.engine.runtime.engine_info import EngineInfo, EngineStats
from glmserve.engine.core.adapters import UnknownAdapterError
from glmserve.engine.lora.manager import AdapterInfo
from glmserve.engine.runtime.messages import (AbortRequest, AdapterCallDone, AddRequest, EngineFailed, Event,
                                              LoadAdapter, RequestFailed, StepDone, StepFailed, UnloadAdapter)
from glmserve.engine.structured.grammars import check_structured
from glmserve.engine.text.tokenizer import ChatGLMTokenizer

log = logging.getLogger(__name__)

StepListener = Callable[[StepDone], None]


class _Stream:
    """A request's deltas on their way to its reader, on the reader's event loop.

    The event thread hands each step's items over with one hop per loop (``_put_all``); the reader takes all that
    is pending at once. After a message, what comes next is held for ``hold`` seconds, so the tokens of that time
    travel as one message, unless it closes a sample or is an error (nothing would join it then). Held deltas go
    out with the stream's first delta after their time is up (every step brings one to each running request), so
    the streams of a batch send together, in one burst per step, rather than each at its own moment: a burst
    costs the protocol stack far less per message (one wake-up of the loop and the sockets for all of them). A
    timer sends them anyway if no delta comes within another ``hold`` (the request stopped getting tokens, say
    while preempted).
    """

    __slots__ = ("loop", "pending", "due", "hold", "urgent", "waiter", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list = []
        self.due = 0.0               # time.monotonic() before which pending deltas are held (0: the first, at once)
        self.hold = 0.0              # the interval `due` was set with
        self.urgent = False          # something pending must go at once
        self.waiter: asyncio.Future | None = None      # the reader, waiting in take()
        self.timer: asyncio.TimerHandle | None = None  # the fallback: wakes the reader if no step comes

    def put(self, item) -> None:
        """On the loop: one delta or error for the reader."""
        self.pending.append(item)
        if not isinstance(item, RequestOutput) or any(o.finish_reason is not None for o in item.outputs):
            self.urgent = True
        self._wake_if_due()

    def _ready(self, now: float) -> bool:
        return bool(self.pending) and (self.urgent or now >= self.due)

    def _wake_if_due(self) -> None:
        if self.waiter is None or self.waiter.done() or not self.pending:
            return
        now = time.monotonic()
        if self._ready(now):
            self.waiter.set_result(None)
        elif self.timer is None:
            self.timer = self.loop.call_later(self.due + self.hold - now, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.waiter is not None and not self.waiter.done() and self.pending:
            self.waiter.set_result(None)

    async def take(self) -> list:
        """Wait until what is pending may go out, and take it all."""
        if not self._ready(time.monotonic()):
            self.waiter = self.loop.create_future()
            try:
                self._wake_if_due()           # deltas held already need the fallback timer
                await self.waiter
            finally:
                self.waiter = None
        self.cancel_timer()
        items, self.pending, self.urgent = self.pending, [], False
        return items

    def handed_out(self, hold: float) -> None:
        """A message has gone: hold what comes next for ``hold`` seconds."""
        self.hold = hold
        self.due = time.monotonic() + hold

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class AsyncEngine:
    def __init__(self, client: EngineCoreClient, max_waiting_requests: int | None = None,
                 stream_interval: float = 0.0, max_messages_per_s: float = 0.0):
        """``stream_interval``: seconds a stream waits after handing out a delta before it hands out the next, so the
        tokens of that time go out as one message (0: every step's delta at once). ``max_messages_per_s`` (0: no
        limit) bounds the messages of all streams together: with more samples running than the interval allows
        for, each stream's interval grows to running samples / rate (a message goes out per sample). A stream's
        first delta is never held (time to first token is unchanged), nor one that closes a sample, nor an
        error."""
        if stream_interval < 0 or max_messages_per_s < 0:
            raise ValueError("stream_interval and max_messages_per_s must be >= 0")
        self.client = client
        self.stream_interval = stream_interval
        self.max_messages_per_s = max_messages_per_s
        self.info: EngineInfo = client.info
        self.tokenizer = ChatGLMTokenizer.from_file(self.info.tokenizer_path)
        self.max_waiting_requests = max_waiting_requests
        self.step_listeners: list[StepListener] = []       # called on the event thread after every step
        self.death_listeners: list[Callable[[str], None]] = []
        self._streams: dict[str, _Stream] = {}
        # request id -> [prompt, samples not finished yet]: deltas come over the pipe without their prompt
        # (messages.py), and the closing delta of an aborted request still needs it (metrics count it).
        self._prompts: dict[str, list] = {}
        # Adds on their way to the engine core = sent - applied; each counter has one writer (the callers' event
        # loop / the event thread), so neither needs a lock.
        self._adds_sent = 0
        self._adds_applied = 0
        self._stats: EngineStats = client.initial_stats
        self._dead: str | None = None
        # The engine core's fine-tunes as of its latest answer (a request naming another is NOT_FOUND at once).
        self.adapters: dict[str, AdapterInfo] = {info.name: info for info in self.info.adapters}
        self._adapter_calls: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._call_ids = itertools.count()
        client.start(self._on_event)

    # ---- public API -------------------------------------------------------------------------------------------
    @property
    def is_dead(self) -> bool:
        return self._dead is not None

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                       priority: int = 0, adapter: str | None = None) -> RequestStream:
        """Stream the request's deltas; the last one of each sample has ``finished`` set. Leaving the iteration
        early (client cancel, deadline), or closing the stream before reading it, aborts the request and frees its
        blocks at once.

        Raises at once (before any output) for invalid input, a duplicate in-flight id, a full waiting queue or
        a dead engine.
        """
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        if request_id in self._streams:
            raise DuplicateRequestError(f"request id {request_id!r} is already in flight")
        if self.max_waiting_requests is not None and self.num_waiting >= self.max_waiting_requests:
            raise QueueFullError(f"the waiting queue is full ({self.max_waiting_requests} requests)")
        prompt, effective = validate_request(prompt_token_ids, params, self.info.limits)
        if adapter is not None and adapter not in self.adapters:   # the engine core checks again
            raise UnknownAdapterError(adapter, list(self.adapters))
        if params.structured is not None:   # a bad schema, regex or grammar fails here, naming the problem
            check_structured(params.structured, chat=params.strip_reply_prefix)
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        self._prompts[request_id] = [prompt, effective.n]
        self._adds_sent += 1
        self.client.send(AddRequest(request_id, prompt, params, priority, time.monotonic(), adapter))
        return RequestStream(self, request_id, self._iterate(request_id, stream, effective.n))

    def abort(self, request_id: str) -> bool:
        """Abort an in-flight request (its blocks are freed before the next step). False if unknown."""
        found = request_id in self._streams
        self.client.send(AbortRequest(request_id))
        return found

    async def load_adapter(self, name: str, path: str, kind=None) -> AdapterInfo:
        """Load a fine-tune (the engine core does it between two steps); raises what EngineCore.load_adapter
        raises."""
        return await self._adapter_call(lambda call_id: LoadAdapter(call_id, name, path, kind))

    async def unload_adapter(self, name: str) -> None:
        """Unload a fine-tune; refused (AdapterInUseError) while requests use it, counting those sent before."""
        await self._adapter_call(lambda call_id: UnloadAdapter(call_id, name))

    async def _adapter_call(self, make_command):
        if self._dead is not None:
            raise EngineDeadError(self._dead)
        call_id = next(self._call_ids)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._adapter_calls[call_id] = (loop, future)
        self.client.send(make_command(call_id))
        return await future

    @property
    def num_waiting(self) -> int:
        return self._stats.num_waiting + self._adds_sent - self._adds_applied

    def stats(self) -> EngineStats:
        """The counters after the latest step, with the requests still on their way counted as waiting."""
        stats = self._stats
        return EngineStats(**{**vars(stats), "num_waiting": self.num_waiting})

    async def shutdown(self) -> None:
        """Stop the engine core and release it (its process, its tensor-parallel workers)."""
        await asyncio.get_running_loop().run_in_executor(None, self.client.shutdown)

    # ---- the caller's side ------------------------------------------------------------------------------------
    def _forget(self, request_id: str) -> None:
        """A stream closed before it was ever read: its generator's cleanup never runs, so do it here."""
        if self._streams.pop(request_id, None) is not None:
            self.abort(request_id)

    def message_interval(self) -> float:
        """The least time between two messages of a stream now: the stream interval, or longer when the running
        samples at that interval would send more than ``max_messages_per_s`` messages a second between them (as
        of the latest step; requests still waiting send nothing, so a long queue does not slow the others)."""
        if self.max_messages_per_s <= 0:
            return self.stream_interval
        return max(self.stream_interval, self._stats.num_running / self.max_messages_per_s)

    async def _iterate(self, request_id: str, stream: _Stream, num_samples: int) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                items = await stream.take()
                # A protocol message costs the frontend (and the client) far more than a token does: the next
                # steps' deltas wait to join into one message, up to the interval.
                stream.handed_out(self.message_interval())
                for item in _coalesce(items):
                    if isinstance(item, BaseException):
                        raise item
                    num_samples -= sum(o.finished for o in item.outputs)
                    finished = num_samples == 0
                    yield item
        finally:
            stream.cancel_timer()
            if not finished:
                self.abort(request_id)
            self._streams.pop(request_id, None)

    # ---- the event thread -------------------------------------------------------------------------------------
    def _on_event(self, event: Event) -> None:
        if isinstance(event, StepDone):
            self._stats = event.stats
            self._adds_applied = event.adds_applied
            self._restore_prompts(event.outputs)
            for listener in self.step_listeners:
                try:
                    listener(event)
                except Exception:  # noqa: BLE001 - metrics must never stop the engine's events
                    log.exception("step listener failed")
            self._deliver([(out.request_id, out) for out in event.outputs])
        elif isinstance(event, AdapterCallDone):
            self._adds_applied = event.adds_applied
            self._stats = event.stats
            self.adapters = {info.name: info for info in event.adapters}
            call = self._adapter_calls.pop(event.call_id, None)
            if call is not None:
                loop, future = call
                loop.call_soon_threadsafe(_settle, future, event.info, event.error)
        elif isinstance(event, RequestFailed):
            self._adds_applied = event.adds_applied
            self._prompts.pop(event.request_id, None)
            self._deliver([(event.request_id, event.error)])
        elif isinstance(event, StepFailed):
            self._adds_applied = event.adds_applied
            for request_id in event.request_ids:
                self._prompts.pop(request_id, None)
            if event.stats is not None:
                self._stats = event.stats
            error = EngineStepError(event.message)
            self._deliver([(request_id, error) for request_id in event.request_ids])
        elif isinstance(event, EngineFailed):
            self._dead = f"the engine has failed: {event.message}"    # before any caller hears of it
            log.error("%s", self._dead)
            self._prompts.clear()
            items: dict[str, BaseException] = {request_id: EngineDeadError(self._dead) for request_id in self._streams}
            if event.failed_step is not None:    # the requests of the step that failed end with its error
                items.update((rid, EngineStepError(event.failed_step.message)) for rid in event.failed_step.request_ids)
            self._deliver(list(items.items()))
            for call_id in list(self._adapter_calls):
                loop, future = self._adapter_calls.pop(call_id)
                loop.call_soon_threadsafe(_settle, future, None, EngineDeadError(self._dead))
            for listener in self.death_listeners:
                listener(self._dead)

    def _restore_prompts(self, outputs: list[RequestOutput]) -> None:
        """Give each delta its request's prompt, and forget a request's prompt once all its samples finished."""
        for out in outputs:
            entry = self._prompts.get(out.request_id)
            if entry is None:
                continue
            if out.prompt_token_ids is None:
                out.prompt_token_ids = entry[0]
            entry[1] -= sum(1 for sample in out.outputs if sample.finished)
            if entry[1] <= 0:
                del self._prompts[out.request_id]

    def _deliver(self, items: list[tuple[str, RequestOutput | BaseException]]) -> None:
        """Hand items to their streams: one hop per event loop, not one per item."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for request_id, item in items:
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:
                pass   # that caller's loop has closed: nobody is left to read


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():       # the caller gave up (cancelled)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class RequestStream:
    """One request's deltas (``async for``); :meth:`aclose` aborts the request unless it finished, even when the
    stream was never read (a bare async generator closed before its first step would skip its cleanup, leaving
    the request running and its id in flight)."""

    def __init__(self, engine: AsyncEngine, request_id: str, deltas: AsyncIterator[RequestOutput]):
        self.request_id = request_id
        self._engine = engine
        self._deltas = deltas
        self._started = False

    def __aiter__(self) -> RequestStream:
        return self

    def __anext__(self):
        self._started = True
        return self._deltas.__anext__()

    async def aclose(self) -> None:
        if not self._started:
            self._started = True
            self._engine._forget(self.request_id)
        await self._deltas.aclose()


def _put_all(batch: list[tuple[_Stream, object]]) -> None:
    for stream, item in batch:
        stream.put(item)


def _coalesce(items: list) -> list:
    """Merge consecutive deltas of a request, sample by sample, so a reader that fell behind (or waited out its
    interval) gets one message per sample instead of one per token; n > 1 samples included. A sample's closing
    delta is never extended, and an error stays in place."""
    merged: list = []
    for item in items:
        prev = merged[-1] if merged else None
        if isinstance(item, RequestOutput) and isinstance(prev, RequestOutput) and not _extends_a_closed_sample(
                prev, item):
            finished = item.finished            # the request's state is the later delta's, not its samples' union
            prev.merge(item)
            prev.finished = finished
        else:
            merged.append(item)
    return merged


def _extends_a_closed_sample(prev: RequestOutput, item: RequestOutput) -> bool:
    closed = {out.index for out in prev.outputs if out.finished}
    return any(out.index in closed for out in item.outputs)
