"""Generate, Chat and the small calls over a real gRPC server (in-process, loopback), against the offline engine."""
from __future__ import annotations

import asyncio
import json

import pytest

from glmserve.engine.entrypoints.grpc.client import AsyncGenerationClient, collect
from glmserve.engine.entrypoints.llm import LLM
from glmserve.engine.core.sampling_params import SamplingParams

from .server_fixtures import MODEL, NUM_KV_BLOCKS, SEED, client, session_server, shared_server  # noqa: F401

PROMPT = "The kettle clicked off just as the first train"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "How are the trains?"}]


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM(MODEL, seed=SEED, num_kv_blocks=NUM_KV_BLOCKS, attention_backend="torch")


@pytest.mark.parametrize("stream", [True, False])
def test_generate_matches_the_offline_engine(client, offline, stream):
    expected = offline.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.0))[0].outputs[0]
    chunks = list(client.generate(PROMPT, max_tokens=12, temperature=0.0, stream=stream))
    # A stream sends a chunk per step, unless the reader fell behind and the server merged its pending deltas
    # (the async engine coalesces them), so under load there may be fewer, never more, and none is empty.
    assert (1 <= len(chunks) <= 12) if stream else len(chunks) == 1
    assert all(c.token_ids for c in chunks)
    assert all(not c.finished for c in chunks[:-1]) and chunks[-1].finished
    (sample,) = collect(chunks)
    assert sample.text == expected.text
    assert sample.token_ids == expected.token_ids
    assert sample.finish_reason == "length"
    prompt_ids = offline.tokenizer.encode(PROMPT)
    assert (sample.usage.prompt_tokens, sample.usage.completion_tokens) == (len(prompt_ids), 12)
    t = sample.timings
    assert 0 <= t.queue_time <= t.time_to_first_token <= t.total_time


@pytest.mark.parametrize("stream", [True, False])
def test_chat_matches_the_offline_engine(client, offline, stream):
    expected = offline.chat(CHAT, SamplingParams(max_tokens=10, temperature=0.0))[0].outputs[0]
    (sample,) = collect(client.chat(CHAT, max_tokens=10, temperature=0.0, stream=stream))
    assert (sample.text, sample.token_ids, sample.finish_reason) == (expected.text, expected.token_ids,
                                                                     expected.finish_reason)


def test_prompt_token_ids_logprobs_and_n(client, offline):
    ids = offline.tokenizer.encode(PROMPT)
    chunks = list(client.generate(prompt_token_ids=ids, max_tokens=4, temperature=0.0, n=2, logprobs=3,
                                  stream=False))
    assert sorted(c.index for c in chunks) == [0, 1]
    expected = offline.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
        max_tokens=4, temperature=0.0, logprobs=3))[0].outputs[0]
    for c in chunks:
        assert c.token_ids == expected.token_ids
        assert len(c.logprobs) == 4 and all(len(top) == 3 for top in c.top_logprobs)
        assert c.logprobs == pytest.approx(expected.logprobs, abs=1e-4)
        assert c.usage.completion_tokens == 4


def test_64_concurrent_streams(shared_server, offline):
    prompts = [f"{PROMPT} number {i}" for i in range(64)]
    expected = offline.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0))

    async def run_all():
        async with AsyncGenerationClient(shared_server.target) as aclient:
            async def one(prompt):
                return [c async for c in aclient.generate(prompt, max_tokens=6, temperature=0.0)]
            return await asyncio.gather(*(one(p) for p in prompts))

    results = asyncio.run(run_all())
    for chunks, want in zip(results, expected):
        (sample,) = collect(chunks)
        assert sample.token_ids == want.outputs[0].token_ids
        assert sample.text == want.outputs[0].text
        # A stream whose reader falls behind gets several tokens merged into one chunk, never more chunks.
        assert 1 <= len(chunks) <= 6 and chunks[-1].finish_reason is not None


def test_tokenize_text_and_chat(client, offline):
    from glmserve.engine.text.chat_format import build_chat_prompt, messages_from_json
    assert client.tokenize(PROMPT) == offline.tokenizer.encode(PROMPT)
    tools = [{"name": "get_weather", "parameters": {"city": "string"}}]
    with_tools = [dict(CHAT[0], tools=tools)] + CHAT[1:]
    assert client.tokenize(messages=CHAT, tools=tools) == build_chat_prompt(offline.tokenizer,
                                                                           messages_from_json(with_tools))
    # No system message: an empty one carries the tools.
    assert client.tokenize(messages=CHAT[1:], tools=json.dumps(tools)) == build_chat_prompt(
        offline.tokenizer, messages_from_json([{"role": "system", "content": "", "tools": tools}] + CHAT[1:]))


def test_model_info_and_load(client, shared_server):
    info = client.model_info()
    engine = shared_server.engine
    assert (info.model, info.max_model_len, info.vocab_size) == (MODEL, engine.max_model_len,
                                                                 engine.tokenizer.vocab_size)
    assert (info.block_size, info.num_kv_blocks, info.dtype) == (16, NUM_KV_BLOCKS, "float32")
    load = client.load()
    assert (load.num_running, load.num_waiting, load.num_total_blocks) == (0, 0, NUM_KV_BLOCKS)
    assert load.kv_cache_usage == 0.0


def test_abort_by_id_ends_the_stream_with_abort(client):
    chunks = client.generate(PROMPT, request_id="to-abort", max_tokens=3000, ignore_eos=True, temperature=0.0)
    first = next(chunks)
    assert first.request_id == "to-abort"
    assert client.abort("to-abort") is True
    rest = list(chunks)
    assert rest[-1].finish_reason == "abort"
    assert client.abort("to-abort") is False
    assert client.abort("never-existed") is False


def test_generated_request_ids_are_unique(client):
    ids = {next(iter(client.generate(PROMPT, max_tokens=1))).request_id for _ in range(3)}
    assert len(ids) == 3 and all(ids)
