"""Continuous batching over the paged KV cache: batched equals alone, preemption, prefix caching, chunked
prefill, aborts and leaks, seeded sampling, refusals. Greedy, fp32, on a glm-tiny checkpoint on disk."""
from __future__ import annotations

import random

import pytest
import torch

from glmserve.engine.core.errors import DuplicateRequestError, RequestError
from glmserve.engine.core.sampling_params import SamplingParams, SamplingParamsError

from .engine_helpers import assert_no_leaks, make_engine, random_prompts, run_to_completion

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def workload():
    """64 requests: prompts of 1-300 tokens, outputs of 1-64 tokens."""
    rng = random.Random(0)
    prompts = random_prompts(64, 2000, (1, 300), seed=1)
    params = [SamplingParams(max_tokens=rng.randint(1, 64), **GREEDY) for _ in prompts]
    return prompts, params


@pytest.fixture(scope="module")
def alone(tiny_checkpoint, workload):
    """Each request run alone in a fresh engine state (prefix caching off so nothing carries over)."""
    engine = make_engine(str(tiny_checkpoint), prefix_caching=False)
    prompts, params = workload
    results = []
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        results.append(run_to_completion(engine, {0: [(f"r{i}", prompt, p)]})[f"r{i}"])
    assert_no_leaks(engine)
    return results


def _shuffled_arrivals(workload, seed: int = 2) -> dict[int, list[tuple]]:
    prompts, params = workload
    order = list(range(len(prompts)))
    random.Random(seed).shuffle(order)
    arrivals: dict[int, list[tuple]] = {}
    for k, i in enumerate(order):   # a few requests every step or two, in shuffled order
        arrivals.setdefault(k // 3, []).append((f"r{i}", prompts[i], params[i]))
    return arrivals


def test_batched_equals_alone(tiny_checkpoint, workload, alone):
    engine = make_engine(str(tiny_checkpoint))
    tokens = run_to_completion(engine, _shuffled_arrivals(workload))
    for i, expected in enumerate(alone):
        assert tokens[f"r{i}"] == expected, f"request {i} differs when batched"
        assert len(expected) == workload[1][i].max_tokens
    assert_no_leaks(engine)


def test_batched_sample_equals_hf(tiny_checkpoint, workload, alone):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    from glmserve.engine.config.model_config import ModelConfig

    from .hf_reference import build_hf_model, hf_greedy
    config = ModelConfig.from_json(str(tiny_checkpoint / "config.json"))
    hf = build_hf_model(config, load_file(str(tiny_checkpoint / "model.safetensors")))
    from glmserve.engine.text.tokenizer import embedded_tokenizer_path, ChatGLMTokenizer
    vocab = ChatGLMTokenizer.from_file(embedded_tokenizer_path()).vocab_size
    prompts, params = workload
    for i in (0, 5, 17, 40):
        assert hf_greedy(hf, prompts[i], params[i].max_tokens, vocab) == alone[i], f"request {i} differs from HF"


def test_preemption_with_a_small_pool_keeps_outputs(tiny_checkpoint, workload, alone):
    prompts, params = workload
    needed = sum(-(-(len(p) + q.max_tokens) // 16) for p, q in zip(prompts, params))
    engine = make_engine(str(tiny_checkpoint), num_kv_blocks=needed // 4)
    tokens = run_to_completion(engine, _shuffled_arrivals(workload))
    assert engine.stats().num_preemptions > 0
    for i, expected in enumerate(alone):
        assert tokens[f"r{i}"] == expected, f"request {i} differs after preemption"
    assert_no_leaks(engine)


def _chat_turns(num_turns: int, vocab: int) -> list[list[int]]:
    """A growing conversation: a shared system prompt, then each turn appends a user message."""
    rng = random.Random(5)
    system = [rng.randrange(3, vocab) for _ in range(70)]
    history, prompts = list(system), []
    for _ in range(num_turns):
        history += [rng.randrange(3, vocab) for _ in range(rng.randint(5, 40))]
        prompts.append(list(history))
        history += [rng.randrange(3, vocab) for _ in range(10)]   # stands in for the reply
    return prompts


def test_prefix_caching_gives_identical_outputs_and_counts_hits(tiny_checkpoint):
    prompts = _chat_turns(6, 2000)
    results = {}
    for caching in (True, False):
        engine = make_engine(str(tiny_checkpoint), prefix_caching=caching)
        out = []
        for i, prompt in enumerate(prompts):   # turn by turn, as a chat client would
            out.append(run_to_completion(engine, {0: [(f"t{i}", prompt, SamplingParams(max_tokens=8, **GREEDY))]})[f"t{i}"])
        results[caching] = out
        stats = engine.stats()
        if caching:
            assert stats.prefix_cache_hits > 0
        else:
            assert stats.prefix_cache_hits == 0
        assert_no_leaks(engine)
    assert results[True] == results[False]


def test_repeated_prompt_recomputes_only_its_uncached_tail(tiny_checkpoint):
    engine = make_engine(str(tiny_checkpoint))
    prompt = random_prompts(1, 2000, (50, 50), seed=9)[0]
    params = SamplingParams(max_tokens=1, **GREEDY)
    first = run_to_completion(engine, {0: [("a", prompt, params)]})["a"]
    hits_before = engine.stats().prefix_cache_hits
    engine.add_request("b", prompt, params)
    engine.step()
    assert engine.last_step_num_tokens == 50 - 48            # 3 full blocks of 16 were cached
    assert engine.stats().prefix_cache_hits - hits_before == 48
    assert run_to_completion(engine) == {}
    engine.add_request("c", prompt, params)
    assert run_to_completion(engine)["c"] == first
    assert_no_leaks(engine)


def test_chunked_prefill_keeps_decodes_advancing(tiny_checkpoint):
    engine = make_engine(str(tiny_checkpoint), max_num_batched_tokens=32)
    short = random_prompts(3, 2000, (5, 5), seed=3)
    long_prompt = random_prompts(1, 2000, (300, 300), seed=4)[0]
    for i, p in enumerate(short):
        engine.add_request(f"s{i}", p, SamplingParams(max_tokens=40, **GREEDY))
    engine.step()                                            # the three prompts prefill together
    engine.add_request("long", long_prompt, SamplingParams(max_tokens=3, **GREEDY))
    prefill_steps = 0
    long_request = engine.scheduler.requests["long", 0]
    while long_request.num_computed_tokens < len(long_prompt):
        before = {f"s{i}": engine.scheduler.requests[f"s{i}", 0].num_output_tokens for i in range(3)}
        engine.step()
        prefill_steps += 1
        for rid, count in before.items():
            assert engine.scheduler.requests[rid, 0].num_output_tokens == count + 1, "a decode stalled"
    assert prefill_steps >= 300 // 32                        # the prompt really went in chunks
    run_to_completion(engine)
    alone = make_engine(str(tiny_checkpoint))
    expected = run_to_completion(alone, {0: [("long", long_prompt, SamplingParams(max_tokens=3, **GREEDY))]})
    assert_no_leaks(engine)
    # chunked result equals an unchunked run of the same prompt
    engine2 = make_engine(str(tiny_checkpoint), max_num_batched_tokens=512)
    assert run_to_completion(engine2, {0: [("long", long_prompt, SamplingParams(max_tokens=3, **GREEDY))]}) == expected


def test_abort_mid_generation_frees_blocks_at_once(tiny_checkpoint):
    engine = make_engine(str(tiny_checkpoint))
    engine.add_request("a", list(range(3, 60)), SamplingParams(max_tokens=50, **GREEDY))
    engine.add_request("b", list(range(3, 30)), SamplingParams(max_tokens=50, **GREEDY))
    for _ in range(3):
        engine.step()
    used = engine.block_manager.num_blocks - engine.block_manager.num_free_blocks
    assert used > 0
    request_a = engine.scheduler.requests["a", 0]
    assert engine.abort_request("a")
    assert engine.block_manager.block_ids(request_a) == []
    assert engine.block_manager.num_blocks - engine.block_manager.num_free_blocks < used
    outs = engine.step()
    aborted = [o for o in outs if o.request_id == "a"]
    assert aborted and aborted[0].finished and aborted[0].outputs[0].finish_reason == "abort"
    assert not engine.abort_request("nope")
    engine.abort_request("b")
    engine.step()
    assert_no_leaks(engine)


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(tiny_checkpoint):
    prompts = random_prompts(6, 2000, (3, 40), seed=11)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    engine = make_engine(str(tiny_checkpoint))
    alone = run_to_completion(engine, {0: [("x", prompts[0], seeded)]})["x"]
    others = [(f"o{i}", p, SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True, seed=None if i % 2 else i))
              for i, p in enumerate(prompts[1:])]
    batched = run_to_completion(engine, {0: others[:3], 1: [("x", prompts[0], seeded)], 2: others[3:]})["x"]
    assert batched == alone
    assert_no_leaks(engine)


def test_n_samples_share_the_prompt_and_differ(tiny_checkpoint):
    engine = make_engine(str(tiny_checkpoint))
    prompt = random_prompts(1, 2000, (40, 40), seed=12)[0]
    engine.add_request("n", prompt, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))
    per_index: dict[int, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "n"
            per_index.setdefault(out.outputs[0].index, []).extend(out.outputs[0].token_ids)
    assert sorted(per_index) == [0, 1, 2] and all(len(v) == 10 for v in per_index.values())
    assert len({tuple(v) for v in per_index.values()}) > 1
    assert engine.stats().prefix_cache_hits >= 32         # children 1 and 2 reuse the prompt's full blocks
    assert_no_leaks(engine)


@pytest.mark.parametrize("prompt, params, field", [
    ([], SamplingParams(), "prompt"),
    ([5, 99999], SamplingParams(), "prompt_token_ids"),
    ([5, -1], SamplingParams(), "prompt_token_ids"),
    ([5] * 4096, SamplingParams(max_tokens=1), "prompt"),
    ([5] * 4000, SamplingParams(max_tokens=200), "max_tokens"),
    ([5], SamplingParams(temperature=-1), "temperature"),
    ([5], SamplingParams(stop_token_ids=[10 ** 6]), "stop_token_ids"),
])
def test_invalid_requests_are_refused_with_the_field_named(tiny_checkpoint, prompt, params, field):
    engine = make_engine(str(tiny_checkpoint))
    with pytest.raises((RequestError, SamplingParamsError)) as info:
        engine.add_request("bad", prompt, params)
    assert info.value.field == field and field.split("_")[0] in str(info.value)
    assert not engine.has_unfinished_requests()
    assert_no_leaks(engine)


def test_request_larger_than_the_whole_cache_is_refused(tiny_checkpoint):
    engine = make_engine(str(tiny_checkpoint), num_kv_blocks=4)
    with pytest.raises(RequestError, match="KV blocks"):
        engine.add_request("big", [5] * 60, SamplingParams(max_tokens=10))


def test_duplicate_request_id_is_refused(tiny_checkpoint):
    engine = make_engine(str(tiny_checkpoint))
    engine.add_request("same", [5, 6], SamplingParams(max_tokens=4))
    with pytest.raises(DuplicateRequestError):
        engine.add_request("same", [5, 6], SamplingParams(max_tokens=4))
    run_to_completion(engine)
    assert_no_leaks(engine)


def test_priority_admits_lower_values_first(tiny_checkpoint):
    engine = make_engine(str(tiny_checkpoint), max_num_seqs=1)
    params = SamplingParams(max_tokens=2, **GREEDY)
    engine.add_request("first", [5, 6, 7], params)
    engine.step()                                            # "first" occupies the only sequence slot
    engine.add_request("late-low", [5, 6, 8], params, priority=5)
    engine.add_request("late-high", [5, 6, 9], params, priority=-1)
    finished = []
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["first", "late-high", "late-low"]
    assert_no_leaks(engine)


def test_offline_api_returns_logprobs_and_text(tiny_checkpoint):
    from glmserve.engine.entrypoints.llm import LLM
    llm = LLM(str(tiny_checkpoint), num_kv_blocks=64)
    (out,) = llm.generate(["hello world"], SamplingParams(max_tokens=4, logprobs=3, **GREEDY))
    sample = out.outputs[0]
    assert len(sample.token_ids) == len(sample.logprobs) == len(sample.top_logprobs) == 4
    for chosen, top in zip(sample.logprobs, sample.top_logprobs):
        assert len(top) == 3 and abs(top[0][1] - chosen) < 1e-5    # greedy picks the most likely token
    assert sample.text == llm.tokenizer.decode(sample.token_ids)
    assert llm.stats().num_free_blocks == 64


def test_unchunked_prefill_needs_a_budget_of_a_whole_context(tiny_checkpoint):
    from glmserve.engine.config.errors import ConfigError
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        make_engine(str(tiny_checkpoint), chunked_prefill=False, max_num_batched_tokens=512)
    engine = make_engine(str(tiny_checkpoint), chunked_prefill=False, max_num_batched_tokens=4096)
    prompts = random_prompts(3, 2000, (100, 300), seed=31)
    params = SamplingParams(max_tokens=3, **GREEDY)
    tokens = run_to_completion(engine, {0: [(f"u{i}", p, params) for i, p in enumerate(prompts)]})
    chunked = make_engine(str(tiny_checkpoint), max_num_batched_tokens=64)
    assert run_to_completion(chunked, {0: [(f"u{i}", p, params) for i, p in enumerate(prompts)]}) == tokens
    assert_no_leaks(engine)


def test_stop_string_ends_the_text_before_it(tiny_checkpoint):
    from glmserve.engine.entrypoints.llm import LLM
    llm = LLM(str(tiny_checkpoint), num_kv_blocks=64)
    prompt = "the quick brown fox"
    (free,) = llm.generate([prompt], SamplingParams(max_tokens=24, **GREEDY))
    text = free.outputs[0].text
    stop = text[len(text) // 3: len(text) // 3 + 3]        # a string in the middle, likely spanning tokens
    assert stop and stop in text
    (stopped,) = llm.generate([prompt], SamplingParams(max_tokens=24, stop=[stop], **GREEDY))
    out = stopped.outputs[0]
    assert out.text == text[:text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == free.outputs[0].token_ids[:len(out.token_ids)]
    assert llm.stats().num_free_blocks == 64


def test_stop_token_ids_and_min_tokens(tiny_checkpoint):
    from glmserve.engine.entrypoints.llm import LLM
    llm = LLM(str(tiny_checkpoint), num_kv_blocks=64)
    prompt_ids = [5, 6, 7, 8]
    (free,) = llm.generate(prompt_token_ids=[prompt_ids], sampling_params=SamplingParams(max_tokens=12, **GREEDY))
    tokens = free.outputs[0].token_ids
    target = tokens[5]
    (stopped,) = llm.generate(prompt_token_ids=[prompt_ids], sampling_params=SamplingParams(
        max_tokens=12, stop_token_ids=[target], **GREEDY))
    first = tokens.index(target)
    assert stopped.outputs[0].token_ids == tokens[:first + 1]            # the stop token is the last token
    assert stopped.outputs[0].finish_reason == "stop" and stopped.outputs[0].stop_reason == target
    (held,) = llm.generate(prompt_token_ids=[prompt_ids], sampling_params=SamplingParams(
        max_tokens=12, min_tokens=12, stop_token_ids=[target], **GREEDY))
    assert len(held.outputs[0].token_ids) == 12 and target not in held.outputs[0].token_ids
    assert held.outputs[0].finish_reason == "length"
