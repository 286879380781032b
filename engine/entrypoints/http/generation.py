"""One HTTP call's engine requests, read as one stream of choices.

A chat is one engine request; a completion has one per prompt (a list of prompts). Each has ``n`` samples;
OpenAI numbers the choices of a call ``prompt_index * n + sample_index``. The requests' deltas are folded with
``RequestOutput.merge`` (the one accumulator), so a finished choice carries its whole sample. Closing the
generation (the client left, or the call failed) aborts every request that has not finished.
"""
from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from glmserve.engine.core.outputs import CompletionOutput, RequestOutput
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.entrypoints.http.errors import error_for
from glmserve.engine.runtime.async_engine import AsyncEngine, RequestStream


@dataclass
class EnginePrompt:
    request_id: str
    token_ids: list[int]
    field: str            # how the request names this prompt, for errors ("messages", "prompt", "prompt[2]")


@dataclass
class ChoiceDelta:
    index: int                              # OpenAI's choice index
    delta: CompletionOutput                 # new text, tokens and log-probs since the previous one
    result: CompletionOutput | None = None  # the whole sample, once it finished


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def to_json(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass
class Generation:
    """Submit with :meth:`start`, read with :meth:`choices`, always :meth:`close`."""

    engine: AsyncEngine
    prompts: list[EnginePrompt]
    params: SamplingParams
    priority: int = 0
    adapter: str | None = None          # a loaded fine-tune (the request's `model`); None: the base model
    # Called on each finished sample before it is handed out (a chat reads its tool call here).
    finish: Callable[[CompletionOutput, str], object] | None = None
    _streams: list[RequestStream] = field(default_factory=list)
    _totals: list[RequestOutput] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.params.n

    async def start(self) -> None:
        """Submit every prompt; if one is refused, the ones submitted before it are aborted and the error raised
        (naming the prompt as the request does, when the error is about the prompt)."""
        for prompt in self.prompts:
            try:
                stream = await self.engine.generate(prompt.request_id, prompt.token_ids, self.params,
                                                    priority=self.priority, adapter=self.adapter)
            except BaseException as exc:
                await self.close()
                if getattr(exc, "field", None) in ("prompt", "prompt_token_ids"):
                    raise error_for(exc, {"prompt": prompt.field, "prompt_token_ids": prompt.field}) from None
                raise
            self._streams.append(stream)
            self._totals.append(RequestOutput.empty(prompt.request_id, prompt.token_ids, self.n))

    async def close(self) -> None:
        for stream in self._streams:
            await stream.aclose()

    def usage(self) -> Usage:
        usage = Usage()
        for total in self._totals:
            usage.prompt_tokens += len(total.prompt_token_ids)
            usage.completion_tokens += sum(len(o.token_ids) for o in total.outputs)
            usage.cached_tokens += total.num_cached_tokens
        return usage

    def results(self) -> list[CompletionOutput]:
        """Every choice's whole sample, in choice order (after :meth:`choices` ran out)."""
        return [o for total in self._totals for o in sorted(total.outputs, key=lambda o: o.index)]

    async def choices(self) -> AsyncIterator[list[ChoiceDelta]]:
        """The choices that advanced, one list per engine delta of one prompt."""
        if len(self._streams) == 1:
            async for delta in self._streams[0]:
                yield self._fold(0, delta)
            return
        async for prompt_index, delta in _merged(self._streams):
            yield self._fold(prompt_index, delta)

    def _fold(self, prompt_index: int, delta: RequestOutput) -> list[ChoiceDelta]:
        total = self._totals[prompt_index]
        total.merge(delta)
        by_index = {o.index: o for o in total.outputs}
        out = []
        for sample in delta.outputs:
            result = None
            if sample.finished:
                result = by_index[sample.index]
                if self.finish is not None:
                    self.finish(result, total.request_id)
            out.append(ChoiceDelta(prompt_index * self.n + sample.index, sample, result))
        return out


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The deltas of several streams as they come, tagged with the stream's position; the first error ends it."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((i, delta))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(done)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)
