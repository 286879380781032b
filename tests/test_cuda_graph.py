"""Decode CUDA graphs (engine/cuda_graph.py). On the CPU the capture is ``EagerReplay`` (the recorded forward re-run
on the static buffers), which tests everything but the CUDA capture itself: buffer copies, padding rows, size
choice, eager fallback. With a GPU the real graphs must give the eager engine's greedy tokens.

A graph step's split-KV count comes from the model length, an eager step's from the batch's context: the same
attention summed in another order, which may move a logit by a rounding error. Greedy tokens are therefore
compared tie-aware: two runs may part only at a step where the reference's best two tokens are within
``NEAR_TIE`` of each other (and from there on their contexts differ, so the rest is not compared)."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from glmserve.engine.model.forward_batch import ForwardBatch
from glmserve.engine.config.engine_config import EngineConfig
from glmserve.engine.config.errors import ConfigError
from glmserve.engine.worker.cuda_graph import EagerReplay, capture_sizes
from glmserve.engine.core.sampling_params import SamplingParams

from .engine_helpers import assert_no_leaks, make_engine, random_prompts

NEAR_TIE = 1e-3       # log-probability gap below which fp32 rounding may pick either token


def test_capture_sizes_cover_every_batch_up_to_the_maximum():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    for n in range(1, 129):
        assert any(b >= n for b in capture_sizes(128))


def _workload(vocab: int):
    # 11 requests with different prompt and output lengths, arriving over several steps: decode batches of many
    # sizes (padded up to a captured size), steps above the largest captured size and mixed prefill steps (eager).
    prompts = random_prompts(11, vocab, (3, 40), seed=5)
    arrivals: dict[int, list[tuple]] = {}
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=0.0, max_tokens=4 + 3 * i, ignore_eos=True, logprobs=2)
        arrivals.setdefault(2 * (i % 4), []).append((f"r{i}", prompt, params))
    return arrivals


def _run_with_logprobs(engine, arrivals) -> dict[str, tuple[list[int], list]]:
    """Step until idle; per request its greedy tokens and each token's top-2 (token, logprob)."""
    arrivals = dict(arrivals)
    got: dict[str, tuple[list[int], list]] = {}
    step = 0
    while arrivals or engine.has_unfinished_requests():
        for request_id, prompt, params in arrivals.pop(step, []):
            engine.add_request(request_id, prompt, params)
        for out in engine.step():
            tokens, tops = got.setdefault(out.request_id, ([], []))
            tokens.extend(out.outputs[0].token_ids)
            tops.extend(out.outputs[0].top_logprobs or [])
        step += 1
    return got


def assert_greedy_equal_up_to_ties(expected: dict, got: dict, max_parted: int = 2) -> None:
    """``expected``/``got``: request id -> (tokens, top-2 logprobs per token). Each request's tokens must be
    equal, or equal up to a step where the expected run's two best tokens were a near-tie and ``got`` took the
    other one; no more than ``max_parted`` requests may part so (a test that every request passes by a tie
    would prove nothing)."""
    assert expected.keys() == got.keys()
    parted = []
    for request_id, (tokens, tops) in expected.items():
        other = got[request_id][0]
        assert len(other) == len(tokens), request_id
        first = next((i for i, (a, b) in enumerate(zip(tokens, other)) if a != b), None)
        if first is None:
            continue
        best = dict(tops[first])
        assert tokens[first] in best and other[first] in best, \
            f"{request_id}: token {first} is {other[first]}, not among the reference's best two {tops[first]}"
        gap = best[tokens[first]] - best[other[first]]
        assert abs(gap) <= NEAR_TIE, f"{request_id}: parted at token {first} with a log-prob gap of {gap:.2e}"
        parted.append(request_id)
    assert len(parted) <= max_parted, f"parted at near-ties: {parted}"


def test_tie_aware_comparison_accepts_only_near_ties():
    ref = {"a": ([5, 6, 7], [[(5, -0.1), (9, -3.0)], [(6, -0.70), (8, -0.7004)], [(7, -0.2), (1, -2.0)]])}
    assert_greedy_equal_up_to_ties(ref, {"a": ([5, 6, 7], [])})
    assert_greedy_equal_up_to_ties(ref, {"a": ([5, 8, 2], [])})             # parted at the near-tie 6/8
    with pytest.raises(AssertionError, match="gap"):
        assert_greedy_equal_up_to_ties(ref, {"a": ([9, 6, 7], [])})          # 9 was 2.9 behind: a real change
    with pytest.raises(AssertionError, match="not among"):
        assert_greedy_equal_up_to_ties(ref, {"a": ([5, 3, 7], [])})
    with pytest.raises(AssertionError, match="parted at near-ties"):
        assert_greedy_equal_up_to_ties({**ref, "b": ref["a"]}, {"a": ([5, 8, 2], []), "b": ([5, 8, 2], [])},
                                       max_parted=1)


def test_graph_replay_gives_the_eager_tokens(tiny_checkpoint):
    eager = make_engine(str(tiny_checkpoint), num_kv_blocks=64, max_num_seqs=16)
    expected = _run_with_logprobs(eager, _workload(eager.tokenizer.vocab_size))

    engine = make_engine(str(tiny_checkpoint), num_kv_blocks=64, max_num_seqs=16)
    engine.runner.enable_decode_graphs(EagerReplay(), max_batch=8)   # sizes 1, 2, 4, 8; 9-11 decodes run eagerly
    got = _run_with_logprobs(engine, _workload(engine.tokenizer.vocab_size))
    assert_greedy_equal_up_to_ties(expected, got)
    assert engine.runner.decode_graphs.replays > 10
    assert_no_leaks(engine)


def test_padding_rows_write_no_kv_and_real_rows_match_eager(tiny_checkpoint):
    engine = make_engine(str(tiny_checkpoint), num_kv_blocks=32, max_num_seqs=8)
    runner = engine.runner
    runner.enable_decode_graphs(EagerReplay(), max_batch=8)
    graphs = runner.decode_graphs
    prompts = random_prompts(3, engine.tokenizer.vocab_size, (5, 30), seed=9)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p{i}", prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
        engine.step()                                   # prefills (eager): the next step is 3 decodes, padded to 4

    captured = {}
    real_forward = graphs.forward

    def spy(input_ids, positions, meta):
        captured["slots"] = meta.slot_mapping.tolist()
        captured["caches"] = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
        hidden = real_forward(input_ids, positions, meta)
        captured["graph"] = hidden.clone()
        with torch.inference_mode():
            captured["eager"] = runner.model(input_ids, positions, ForwardBatch(meta))   # rewrites the same K/V into the same slots
        return hidden
    graphs.forward = spy
    before = graphs.replays
    engine.step()
    assert graphs.replays == before + 1 and len(captured["slots"]) == 3
    torch.testing.assert_close(captured["graph"], captured["eager"], rtol=1e-5, atol=1e-5)
    changed = set()
    for (k0, v0), (k1, v1) in zip(captured["caches"], runner.kv_caches):
        diff = ((k0 != k1) | (v0 != v1)).flatten(0, 1).any(-1).any(-1)     # [num_blocks * block_size] slots
        changed |= set(torch.nonzero(diff).flatten().tolist())
    assert changed <= set(captured["slots"]), "a padding row wrote into the KV cache"
    while engine.has_unfinished_requests():
        engine.step()
    assert_no_leaks(engine)


def test_cuda_graphs_need_cuda_and_a_single_rank():
    with pytest.raises(ConfigError, match="cuda_graphs needs a CUDA device"):
        EngineConfig(model="glm-tiny", device="cpu", cuda_graphs=True)
    with pytest.raises(ConfigError, match="tensor_parallel_size 1"):
        EngineConfig(model="glm-tiny", device="cuda", cuda_graphs=True, tensor_parallel_size=2)


def test_cli_rejects_cuda_graphs_on_cpu():
    proc = subprocess.run([sys.executable, "-m", "glmserve.engine.entrypoints.cli.main", "generate", "--model", "glm-tiny",
                           "--load-format", "dummy", "--cuda-graphs", "--prompt", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "cuda_graphs needs a CUDA device" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_equal_eager_on_gpu(tiny_checkpoint):
    from glmserve.engine.entrypoints.llm import LLM
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
    prompts = random_prompts(20, 2000, (3, 60), seed=2)
    outputs = {}
    for graphs in (False, True):
        # An explicit pool: sized by gpu_memory_utilization, each engine would claim 90% of the card.
        llm = LLM(str(tiny_checkpoint), device="cuda", dtype="float32", max_num_seqs=16, num_kv_blocks=256,
                  cuda_graphs=graphs)
        results = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        outputs[graphs] = {str(i): (o.outputs[0].token_ids, o.outputs[0].top_logprobs) for i, o in enumerate(results)}
        if graphs:
            assert llm.engine.runner.decode_graphs.replays > 0
        del llm
    assert_greedy_equal_up_to_ties(outputs[False], outputs[True])
