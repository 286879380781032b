"""One timed run: send each request at its arrival time, at most ``max_concurrency`` at once, and collect records.

Requests of one multiturn session are sent in turn order: a turn goes at its arrival time or when the previous
turn's reply is in, whichever is later, and carries the session's history (its earlier messages and the
replies actually received). A turn that fails leaves the history as it was.
"""
from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import uuid
from dataclasses import dataclass

from tqdm import tqdm

from glmserve.bench.serve.backend import Backend
from glmserve.bench.serve.chaos_plan import Chaos
from glmserve.bench.serve.client import RequestRecord
from glmserve.bench.serve.datasets import BenchPrompt
from glmserve.bench.serve.grpc_backend import as_backend


@dataclass(frozen=True)
class Planned:
    """A request with its place in the schedule."""

    index: int
    prompt: BenchPrompt
    offset: float                # seconds after the run's start
    chaos: Chaos | None = None


@dataclass
class RunRecords:
    records: list[RequestRecord]   # in plan order
    duration: float                # first send to last reply, seconds


async def run_plan(backend: Backend, plan: list[Planned], *, temperature: float,
                   max_concurrency: int | None, progress: bool = False, label: str = "",
                   structured: dict | None = None) -> RunRecords:
    """``backend``: a backend, or a gRPC client (the gRPC backend)."""
    backend = as_backend(backend)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    records: list[RequestRecord | None] = [None] * len(plan)
    run_id = uuid.uuid4().hex[:8]   # request ids must be unique among in-flight requests, across harnesses too
    bar = tqdm(total=len(plan), desc=label or None, unit="req", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    start = time.perf_counter()

    async def play(queue: list[Planned]) -> None:
        """Send ``queue`` (one request, or a session's turns) in order."""
        history: list[dict] = []
        for item in queue:
            delay = start + item.offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with slots if slots is not None else contextlib.nullcontext():
                record = await backend.send(f"bench-{run_id}-{item.index}", item.prompt, history, temperature,
                                            item.chaos, structured)
            records[item.index] = record
            bar.update()
            if record.ok and item.prompt.messages is not None and item.prompt.session is not None:
                history += [{"role": r, "content": c} for r, c in item.prompt.messages]
                history.append({"role": "assistant", "content": record.reply})

    try:
        await asyncio.gather(*(play(queue) for queue in _queues(plan)))
    finally:
        bar.close()
    return RunRecords(records, time.perf_counter() - start)


def _queues(plan: list[Planned]) -> list[list[Planned]]:
    """One queue per multiturn session (turns in order) and one per other request."""
    sessions: dict[int, list[Planned]] = {}
    queues = []
    for item in plan:
        session = item.prompt.session
        if session is None:
            queues.append([item])
        else:
            if session not in sessions:
                sessions[session] = []
                queues.append(sessions[session])
            sessions[session].append(item)
    for queue in sessions.values():
        queue.sort(key=lambda item: item.prompt.turn)
    return queues
