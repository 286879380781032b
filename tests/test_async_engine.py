"""AsyncEngine: validation in the caller, adds/aborts through the engine thread, coalesced deltas."""
from __future__ import annotations

import asyncio
import time

import pytest

from glmserve.engine.runtime.async_engine import AsyncEngine, _coalesce, _Stream
from glmserve.engine.runtime.core_client import InprocEngineCore
from glmserve.engine.core.errors import DuplicateRequestError, RequestError
from glmserve.engine.core.outputs import CompletionOutput, RequestOutput
from glmserve.engine.core.sampling_params import SamplingParams

from .engine_helpers import assert_no_leaks, make_engine


def _delta(index: int, tokens: list[int], text: str, finish: str | None = None,
           request_finished: bool | None = None) -> RequestOutput:
    """A one-sample delta; the request finishes with it unless ``request_finished`` says otherwise (n > 1)."""
    done = finish is not None if request_finished is None else request_finished
    return RequestOutput("r", [1], [CompletionOutput(index, text, tokens, finish)], done)


def test_coalesce_merges_consecutive_deltas_sample_by_sample():
    error = RuntimeError("boom")
    items = [_delta(0, [1], "a"), _delta(0, [2], "b"), _delta(1, [7], "x"), _delta(0, [3], "c"),
             _delta(0, [4], "d", "length", request_finished=False), error, _delta(1, [8], "y")]
    merged = _coalesce(items)
    assert len(merged) == 3 and merged[1] is error
    first = merged[0]
    assert [(o.index, o.token_ids, o.text, o.finish_reason) for o in first.outputs] == [
        (0, [1, 2, 3, 4], "abcd", "length"), (1, [7], "x", None)]
    assert not first.finished                 # sample 1 goes on: the request is not finished
    assert merged[2].outputs[0].token_ids == [8]
    # a sample's closing delta is never extended
    done = _coalesce([_delta(0, [1], "a", "stop"), _delta(0, [2], "b")])
    assert len(done) == 2 and done[0].outputs[0].token_ids == [1]
    # the request's state is the later delta's
    last = _coalesce([_delta(0, [1], "a"), _delta(0, [2], "b", "stop")])
    assert len(last) == 1 and last[0].finished and last[0].outputs[0].token_ids == [1, 2]


def test_stream_validation_abort_and_no_leaks(tiny_checkpoint):
    engine = make_engine(str(tiny_checkpoint))

    async def scenario():
        async_engine = AsyncEngine(InprocEngineCore(engine))
        try:
            with pytest.raises(RequestError):
                await async_engine.generate("bad", [], SamplingParams())
            stream = await async_engine.generate("a", [5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True))
            with pytest.raises(DuplicateRequestError):
                await async_engine.generate("a", [5], SamplingParams())
            tokens = []
            async for delta in stream:
                tokens += delta.outputs[0].token_ids
                if len(tokens) >= 3:
                    break
            await stream.aclose()                     # a client leaving early aborts the request
            full = [t async for d in await async_engine.generate(
                "b", [5, 6, 7], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
                for t in d.outputs[0].token_ids]
            assert len(full) == 5
            for _ in range(50):                       # the abort is applied by the engine thread
                if not engine.has_unfinished_requests():
                    break
                await asyncio.sleep(0.02)
        finally:
            await async_engine.shutdown()

    asyncio.run(scenario())
    assert_no_leaks(engine)


def test_a_stream_closed_before_it_was_read_aborts_its_request(tiny_checkpoint):
    engine = make_engine(str(tiny_checkpoint))

    async def scenario():
        async_engine = AsyncEngine(InprocEngineCore(engine))
        finished = []
        async_engine.step_listeners.append(lambda step: finished.extend(
            (out.request_id, o.finish_reason) for out in step.outputs for o in out.outputs if o.finished))
        try:
            stream = await async_engine.generate("unread", [5, 6, 7], SamplingParams(max_tokens=300, ignore_eos=True))
            await stream.aclose()                     # never iterated: the request is aborted all the same
            assert not async_engine.abort("unread")   # and the frontend no longer knows its id
            for _ in range(200):
                if ("unread", "abort") in finished:
                    break
                await asyncio.sleep(0.02)
            assert finished == [("unread", "abort")]
        finally:
            await async_engine.shutdown()

    asyncio.run(scenario())
    assert_no_leaks(engine)


def test_a_step_crosses_the_pipe_without_prompts_and_gets_them_back():
    """StepDone pickles each delta without its prompt (and timestamps only on a closing delta); AsyncEngine puts the
    prompt back from the request it sent, and forgets it once every sample finished."""
    import pickle

    from glmserve.engine.core.outputs import RequestMetrics
    from glmserve.engine.runtime.messages import StepDone

    prompt = list(range(3, 500))
    running = RequestOutput("r", prompt, [CompletionOutput(0, " a", [7], logprobs=[-0.5], top_logprobs=[[(7, -0.5)]])],
                            False, 16, RequestMetrics(1.0, 2.0))
    closing = RequestOutput("r", prompt, [CompletionOutput(1, "b", [8], "length")], True, 16, RequestMetrics(1.0, 2.0))
    step = StepDone([running, closing], None, 2, 5.0, 1)
    wire = pickle.dumps(step)
    assert len(wire) < 400                                  # a 497-token prompt would not fit: it is not sent
    back = pickle.loads(wire)
    assert [o.prompt_token_ids for o in back.outputs] == [None, None]
    assert back.outputs[0].outputs[0] == running.outputs[0] and back.outputs[1].outputs[0] == closing.outputs[0]
    assert back.outputs[0].metrics is None and back.outputs[1].metrics == closing.metrics

    engine = AsyncEngine.__new__(AsyncEngine)
    engine._prompts = {"r": [prompt, 2]}
    engine._restore_prompts(back.outputs)
    assert back.outputs[0].prompt_token_ids is prompt and engine._prompts == {"r": [prompt, 1]}
    engine._restore_prompts([pickle.loads(pickle.dumps(StepDone([closing], None, 1, 6.0, 1))).outputs[0]])
    assert engine._prompts == {}


def _one_paced_stream(engine, params: SamplingParams, **pacing) -> tuple[list[RequestOutput], float]:
    """One request's deltas through an AsyncEngine built with ``pacing`` (its keyword arguments), and the seconds
    the stream took."""
    async def scenario():
        async_engine = AsyncEngine(InprocEngineCore(engine), **pacing)
        try:
            start = time.monotonic()
            deltas = [d async for d in await async_engine.generate("paced", [5, 6, 7], params)]
            return deltas, time.monotonic() - start
        finally:
            await async_engine.shutdown()
    return asyncio.run(scenario())


def test_a_stream_interval_joins_the_tokens_of_that_time_into_one_delta(tiny_checkpoint):
    """With a stream interval, the first delta goes out at once (one token) and later ones carry every token of
    at least the interval: a 60-token stream gets at most one delta per interval elapsed, and every token."""
    interval = 0.05
    engine = make_engine(str(tiny_checkpoint))
    outputs, elapsed = _one_paced_stream(engine, SamplingParams(max_tokens=60, min_tokens=60, temperature=0.0),
                                         stream_interval=interval)
    deltas = [d.outputs[0].token_ids for d in outputs]
    assert len(deltas[0]) == 1 and sum(map(len, deltas)) == 60
    assert len(deltas) <= 2 + elapsed / interval
    assert_no_leaks(engine)


def test_a_closing_delta_is_never_held(tiny_checkpoint):
    """However long the interval, a stream's first delta and its closing one go out at once: a 5-token stream
    under a 30 s interval is two messages at most, done long before the interval is."""
    engine = make_engine(str(tiny_checkpoint))
    outputs, elapsed = _one_paced_stream(engine, SamplingParams(max_tokens=5, min_tokens=5, temperature=0.0),
                                         stream_interval=30.0)
    deltas = [d.outputs[0] for d in outputs]
    # The first message (one token, or more if the engine got ahead of this reader) and the closing one.
    assert len(deltas) <= 2 and sum(len(d.token_ids) for d in deltas) == 5
    assert deltas[-1].finish_reason == "length" and elapsed < 30
    assert_no_leaks(engine)


def test_the_message_budget_stretches_every_streams_interval(tiny_checkpoint):
    """max_messages_per_s bounds the messages of all streams together: 4 streams at 50 messages/s send one
    message per 4/50 = 80 ms each at most (besides the first and the closing one), and every token arrives."""
    engine = make_engine(str(tiny_checkpoint))
    streams, budget = 4, 50.0

    async def scenario():
        async_engine = AsyncEngine(InprocEngineCore(engine), stream_interval=0.0, max_messages_per_s=budget)
        try:
            assert async_engine.message_interval() == 0.0          # no stream in flight: no stretching
            start = time.monotonic()

            async def one(i):
                return [len(d.outputs[0].token_ids) async for d in await async_engine.generate(
                    f"s{i}", [5, 6, 7 + i], SamplingParams(max_tokens=40, min_tokens=40, temperature=0.0))]
            counts = await asyncio.gather(*(one(i) for i in range(streams)))
            return counts, time.monotonic() - start
        finally:
            await async_engine.shutdown()

    counts, elapsed = asyncio.run(scenario())
    for per_message in counts:
        assert sum(per_message) == 40
        assert len(per_message) <= 3 + elapsed / (streams / budget)
    assert_no_leaks(engine)


def test_a_held_delta_goes_out_on_its_own_when_no_step_follows():
    """Held deltas normally leave with the first step after their time is up; if none comes (the request stopped
    getting tokens), a timer hands them over after another interval."""
    async def scenario():
        stream = _Stream(asyncio.get_running_loop())
        stream.handed_out(0.05)
        stream.put(_delta(0, [1], "a"))
        stream.put(_delta(0, [2], "b"))
        start = time.monotonic()
        items = await asyncio.wait_for(stream.take(), 10)
        return items, time.monotonic() - start

    items, waited = asyncio.run(scenario())
    assert [item.outputs[0].token_ids for item in items] == [[1], [2]]
    assert waited >= 0.05           # held for the interval at least, not handed over at once


def test_an_error_is_never_held():
    async def scenario():
        stream = _Stream(asyncio.get_running_loop())
        stream.handed_out(60.0)
        stream.put(_delta(0, [1], "a"))
        error = RuntimeError("the step failed")
        stream.put(error)
        return await asyncio.wait_for(stream.take(), 10), error

    items, error = asyncio.run(scenario())
    assert items[-1] is error and len(items) == 2


def test_a_stream_of_n_samples_is_paced_too(tiny_checkpoint):
    """n > 1: a message carries every sample's tokens of its interval, not one step's: 3 samples of 40 tokens under
    a 50 ms interval arrive whole, in few messages."""
    interval = 0.05
    engine = make_engine(str(tiny_checkpoint))
    deltas, elapsed = _one_paced_stream(
        engine, SamplingParams(n=3, max_tokens=40, min_tokens=40, temperature=1.0, seed=1), stream_interval=interval)
    tokens: dict[int, list[int]] = {}
    for delta in deltas:
        for sample in delta.outputs:
            tokens.setdefault(sample.index, []).extend(sample.token_ids)
    assert sorted(tokens) == [0, 1, 2] and all(len(t) == 40 for t in tokens.values())
    assert deltas[-1].finished and sum(o.finished for d in deltas for o in d.outputs) == 3
    assert len(deltas) <= 4 + elapsed / interval      # the first, up to three closing ones, one per interval
    assert_no_leaks(engine)


def test_the_message_budget_counts_running_samples_not_waiting_requests():
    """A long queue must not make the running streams chunky: the interval follows the samples in the running
    batch (the latest step's count), not every stream in flight."""
    from glmserve.engine.runtime.engine_info import EngineStats
    engine = AsyncEngine.__new__(AsyncEngine)
    engine.stream_interval, engine.max_messages_per_s = 0.02, 4000.0
    engine._streams = {f"r{i}": None for i in range(1000)}          # 1000 in flight ...
    engine._stats = EngineStats(100, 50, num_running=8, num_waiting=992, num_preemptions=0,
                                prefix_cache_queries=0, prefix_cache_hits=0, kv_cache_usage=0.5)
    assert engine.message_interval() == 0.02                      # ... 8 running: the stream interval
    engine._stats = EngineStats(100, 50, num_running=256, num_waiting=744, num_preemptions=0,
                                prefix_cache_queries=0, prefix_cache_hits=0, kv_cache_usage=0.5)
    assert engine.message_interval() == 256 / 4000.0
    engine.max_messages_per_s = 0.0                                # no budget
    assert engine.message_interval() == 0.02
