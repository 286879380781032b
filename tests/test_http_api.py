"""The OpenAI-compatible HTTP API through the official ``openai`` client, against a real server on loopback (the
shared in-process server, which serves gRPC and HTTP over one engine): greedy text equals gRPC's and the offline
engine's, streaming, usage, n, log-probs, every prompt shape of completions, the model list and health."""
from __future__ import annotations

import asyncio
import json
import urllib.request

import openai
import pytest

from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.entrypoints.grpc.client import collect
from glmserve.engine.entrypoints.llm import LLM

from .server_fixtures import (MODEL, NUM_KV_BLOCKS, SEED, client, http_json, parse_metrics,  # noqa: F401
                              session_server, shared_server)

PROMPT = "The kettle clicked off just as the first train"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "How are the trains?"}]


@pytest.fixture(scope="module")
def offline() -> LLM:
    return LLM(MODEL, seed=SEED, num_kv_blocks=NUM_KV_BLOCKS, attention_backend="torch")


@pytest.fixture
def api(shared_server) -> openai.OpenAI:
    with openai.OpenAI(base_url=shared_server.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def streamed_chat_text(chunks) -> tuple[str, str | None]:
    text, finish = "", None
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, finish


@pytest.mark.parametrize("stream", [False, True])
def test_chat_greedy_text_equals_grpc_and_offline(api, client, offline, stream):
    expected = offline.chat(CHAT, SamplingParams(max_tokens=10, temperature=0.0))[0].outputs[0]
    (over_grpc,) = collect(client.chat(CHAT, max_tokens=10, temperature=0.0, stream=stream))
    reply = api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0.0, stream=stream)
    if stream:
        text, finish = streamed_chat_text(reply)
    else:
        (choice,) = reply.choices
        text, finish = choice.message.content, choice.finish_reason
        assert choice.message.role == "assistant" and choice.message.tool_calls is None
        assert reply.object == "chat.completion" and reply.model == MODEL and reply.id.startswith("chatcmpl-")
        assert reply.usage.completion_tokens == 10
        assert reply.usage.prompt_tokens == len(client.tokenize(messages=CHAT))
    assert text == over_grpc.text == expected.text
    assert finish == "length" == expected.finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_completion_greedy_text_equals_grpc_and_offline(api, client, offline, stream):
    expected = offline.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.0))[0].outputs[0]
    (over_grpc,) = collect(client.generate(PROMPT, max_tokens=12, temperature=0.0, stream=stream))
    reply = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0.0, stream=stream,
                                   extra_body={"return_token_ids": True})
    if stream:
        chunks = list(reply)
        text = "".join(c.choices[0].text for c in chunks)
        token_ids = [t for c in chunks for t in c.choices[0].model_extra["token_ids"]]
        finish = chunks[-1].choices[0].finish_reason
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    else:
        (choice,) = reply.choices
        text, token_ids, finish = choice.text, choice.model_extra["token_ids"], choice.finish_reason
        prompt_len = len(offline.tokenizer.encode(PROMPT))
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (prompt_len, 12)
        assert reply.usage.total_tokens == prompt_len + 12
        assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert text == over_grpc.text == expected.text
    assert token_ids == over_grpc.token_ids == expected.token_ids
    assert finish == "length"


def test_completion_prompt_shapes(api, offline):
    """A string, a list of strings, a list of token ids, a list of lists: each prompt's choices in order."""
    prompts = [PROMPT, "Another prompt", "A third"]
    ids = [offline.tokenizer.encode(p) for p in prompts]
    greedy = SamplingParams(max_tokens=5, temperature=0.0)
    expected = [o.outputs[0].text for o in offline.generate(prompts, greedy)]

    def texts(prompt) -> list[str]:
        reply = api.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0.0)
        assert [c.index for c in reply.choices] == list(range(len(reply.choices)))
        return [c.text for c in reply.choices]

    assert texts(prompts[0]) == expected[:1]
    assert texts(prompts) == expected
    assert texts(ids[1]) == expected[1:2]
    assert texts(ids) == expected
    reply = api.completions.create(model=MODEL, prompt=prompts[:2], max_tokens=5, temperature=0.0)
    assert reply.usage.prompt_tokens == len(ids[0]) + len(ids[1])


def test_n_2_streamed_and_not(api):
    reply = api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, n=2, temperature=0.0)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content == reply.choices[1].message.content   # greedy: the same text
    assert reply.usage.completion_tokens == 12
    texts = {0: "", 1: ""}
    finishes = {}
    for chunk in api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, n=2, temperature=0.0,
                                             stream=True):
        (choice,) = chunk.choices          # one choice per chunk, as OpenAI sends them
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes[choice.index] = choice.finish_reason
    assert texts == {0: reply.choices[0].message.content, 1: reply.choices[1].message.content}
    assert finishes == {0: "length", 1: "length"}
    # Sampled with a seed: the two samples differ from each other, and a repeat of the call repeats them.
    sampled = [api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, n=2, seed=7, temperature=1.0)
               for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]
    assert sampled[0].choices[0].text != sampled[0].choices[1].text


def test_logprobs_chat_and_completion(api, offline):
    ids = offline.tokenizer.encode(PROMPT)
    expected = offline.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(
        max_tokens=4, temperature=0.0, logprobs=3))[0].outputs[0]
    reply = api.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0.0, logprobs=3)
    lp = reply.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(expected.logprobs, abs=1e-4)
    assert len(lp.tokens) == 4 and all(len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # The chosen (greedy) token is the most likely one.
    assert all(max(top.values()) == pytest.approx(chosen, abs=1e-5) for top, chosen in
               zip(lp.top_logprobs, lp.token_logprobs))

    chat = api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0.0, logprobs=True,
                                       top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-5)
        assert entry.top_logprobs[0].token == entry.token
        assert isinstance(entry.bytes, list)
    streamed = [c for c in api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0.0,
                                                       logprobs=True, top_logprobs=2, stream=True) if c.choices]
    tokens = [e.token for c in streamed if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert tokens == [e.token for e in content]


def test_stream_usage_and_cached_tokens(api, offline):
    long_prompt = " ".join(["the train is late again today"] * 12)    # several full KV blocks to reuse
    prompt_len = len(offline.tokenizer.encode(long_prompt))
    usages = []
    for _ in range(2):
        chunks = list(api.completions.create(model=MODEL, prompt=long_prompt, max_tokens=3, temperature=0.0,
                                             stream=True, stream_options={"include_usage": True}))
        assert all(c.usage is None for c in chunks[:-1])
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        usages.append(chunks[-1].usage)
    assert [(u.prompt_tokens, u.completion_tokens) for u in usages] == [(prompt_len, 3)] * 2
    # The second call finds the first one's prompt blocks in the prefix cache (whole blocks of 16 tokens).
    assert usages[1].prompt_tokens_details.cached_tokens >= 16 * ((prompt_len - 1) // 16) - 16
    assert usages[1].prompt_tokens_details.cached_tokens > usages[0].prompt_tokens_details.cached_tokens

    chat_chunks = list(api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3, stream=True,
                                                   stream_options={"include_usage": True}))
    assert chat_chunks[0].choices[0].delta.role == "assistant"
    assert chat_chunks[-1].usage.completion_tokens == 3


def test_stop_strings_and_vllm_extras(api, offline):
    """stop, stop_token_ids, min_tokens, ignore_eos, top_k, min_p, repetition_penalty and penalties reach the
    engine: the same request offline gives the same text."""
    extras = dict(top_k=5, min_p=0.01, repetition_penalty=1.2, ignore_eos=True, min_tokens=6)
    params = SamplingParams(max_tokens=8, temperature=0.0, presence_penalty=0.5, frequency_penalty=0.5, **extras)
    expected = offline.generate(PROMPT, params)[0].outputs[0]
    reply = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0.0, presence_penalty=0.5,
                                   frequency_penalty=0.5, user="tester", extra_body=extras)
    assert reply.choices[0].text == expected.text
    stop = expected.text[2:4]
    stopped = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0.0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop" and stop not in stopped.choices[0].text
    assert expected.text.startswith(stopped.choices[0].text)
    first = offline.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0.0))[0].outputs[0].token_ids
    by_id = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0.0,
                                   extra_body={"stop_token_ids": [first[1]], "return_token_ids": True})
    assert by_id.choices[0].finish_reason == "stop" and by_id.choices[0].model_extra["token_ids"] == first[:2]


def test_models_and_health(api, shared_server):
    (model,) = api.models.list().data
    assert model.id == MODEL and model.owned_by == "glmserve"
    assert model.model_extra["max_model_len"] == shared_server.engine.max_model_len
    assert api.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("gpt-4")
    with urllib.request.urlopen(f"http://127.0.0.1:{shared_server.server.http_port}/health", timeout=10) as r:
        assert r.status == 200 and json.loads(r.read()) == {"status": "serving"}


def test_tokenize_matches_grpc(shared_server, client):
    url = f"http://127.0.0.1:{shared_server.server.http_port}/tokenize"
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    status, reply = http_json(url, {"messages": CHAT, "tools": tools})
    assert status == 200 and reply["tokens"] == client.tokenize(messages=CHAT, tools=[t["function"] for t in tools])
    assert http_json(url, {"prompt": PROMPT})[1]["tokens"] == client.tokenize(PROMPT)


def test_http_calls_are_counted_by_route_and_status(api, shared_server):
    def count(route: str, status: str) -> float:
        return parse_metrics(shared_server.metrics_text()).get(
            ("glmserve_http_requests_total", (("route", route), ("status", status))), 0.0)
    ok, bad = count("/v1/completions", "200"), count("/v1/completions", "400")
    api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=-1.0)
    assert (count("/v1/completions", "200"), count("/v1/completions", "400")) == (ok + 1, bad + 1)


def test_concurrent_streams_over_http_equal_offline(shared_server, offline):
    prompts = [f"{PROMPT} number {i}" for i in range(32)]
    expected = offline.generate(prompts, SamplingParams(max_tokens=6, temperature=0.0))

    async def run_all():
        async with openai.AsyncOpenAI(base_url=shared_server.base_url, api_key="unused", max_retries=0) as aapi:
            async def one(prompt):
                stream = await aapi.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0.0,
                                                       stream=True)
                return "".join([c.choices[0].text async for c in stream])
            return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(run_all()) == [o.outputs[0].text for o in expected]
