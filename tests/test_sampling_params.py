"""SamplingParams: vLLM defaults, normalisation, and one test per invalid value (field and message)."""
from __future__ import annotations

import math

import pytest

from glmserve.engine.core.sampling_params import SamplingParams, SamplingParamsError

VOCAB = 64798


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p) == (1, 1.0, 1.0, -1, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.seed, p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids) == (None, 16, 0, [], [])
    assert (p.ignore_eos, p.logprobs, p.skip_special_tokens) == (False, None, True)
    p.validate(vocab_size=VOCAB, max_model_len=8192, prompt_len=100)


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]


def test_clone_changes_only_given_fields():
    p = SamplingParams(temperature=0.5, stop=["x"])
    q = p.clone(max_tokens=3)
    assert (q.temperature, q.stop, q.max_tokens) == (0.5, ["x"], 3)
    assert p.max_tokens == 16 and q.stop is not p.stop


def test_valid_edge_values():
    for p in (SamplingParams(temperature=0.0), SamplingParams(top_p=1.0), SamplingParams(top_k=0),
              SamplingParams(top_k=-1), SamplingParams(min_p=1.0), SamplingParams(presence_penalty=-2.0),
              SamplingParams(frequency_penalty=2.0), SamplingParams(max_tokens=None), SamplingParams(seed=0),
              SamplingParams(min_tokens=16, max_tokens=16), SamplingParams(stop_token_ids=[0, VOCAB - 1]),
              SamplingParams(logprobs=0), SamplingParams(logprobs=20)):
        p.validate(vocab_size=VOCAB)
    SamplingParams(max_tokens=92).validate(vocab_size=VOCAB, max_model_len=100, prompt_len=8)


@pytest.mark.parametrize("changes, field, fragment", [
    ({"temperature": -0.1}, "temperature", ">= 0"),
    ({"temperature": math.nan}, "temperature", "finite"),
    ({"temperature": math.inf}, "temperature", "finite"),
    ({"top_p": 0.0}, "top_p", "(0, 1]"),
    ({"top_p": 1.5}, "top_p", "(0, 1]"),
    ({"top_k": -2}, "top_k", "[-1, inf]"),
    ({"min_p": -0.1}, "min_p", "[0, 1]"),
    ({"min_p": 1.1}, "min_p", "[0, 1]"),
    ({"repetition_penalty": 0.0}, "repetition_penalty", "> 0"),
    ({"repetition_penalty": -1.0}, "repetition_penalty", "> 0"),
    ({"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
    ({"presence_penalty": -2.5}, "presence_penalty", "[-2, 2]"),
    ({"frequency_penalty": 2.01}, "frequency_penalty", "[-2, 2]"),
    ({"frequency_penalty": -3}, "frequency_penalty", "[-2, 2]"),
    ({"max_tokens": 0}, "max_tokens", "[1, inf]"),
    ({"min_tokens": -1}, "min_tokens", "[0, 16]"),
    ({"min_tokens": 17}, "min_tokens", "[0, 16]"),
    ({"stop": [""]}, "stop", "non-empty"),
    ({"stop": ["ok", ""]}, "stop", "non-empty"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", f"[0, {VOCAB - 1}]"),
    ({"stop_token_ids": [2, VOCAB]}, "stop_token_ids", f"[0, {VOCAB - 1}]"),
    ({"n": 0}, "n", "[1, inf]"),
    ({"logprobs": -1}, "logprobs", "[0, 20]"),
    ({"logprobs": 21}, "logprobs", "[0, 20]"),
    ({"seed": 1.5}, "seed", "integer"),
    ({"seed": "7"}, "seed", "integer"),
    ({"seed": True}, "seed", "integer"),
])
def test_invalid_value_names_field_and_range(changes, field, fragment):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(**changes).validate(vocab_size=VOCAB)
    assert info.value.field == field
    message = str(info.value)
    assert message.startswith(field) and fragment in message, message
    assert isinstance(info.value, ValueError)


def test_prompt_plus_max_tokens_over_context():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(max_tokens=93).validate(vocab_size=VOCAB, max_model_len=100, prompt_len=8)
    assert info.value.field == "max_tokens"
    assert "8" in str(info.value) and "93" in str(info.value) and "101" in str(info.value)
    assert "max_model_len 100" in str(info.value)


def test_context_check_needs_both_numbers():
    SamplingParams(max_tokens=10_000).validate(vocab_size=VOCAB, max_model_len=100)
    SamplingParams(max_tokens=10_000).validate(vocab_size=VOCAB, prompt_len=8)
    SamplingParams(max_tokens=None).validate(vocab_size=VOCAB, max_model_len=100, prompt_len=8)


def test_greedy_threshold():
    assert SamplingParams(temperature=0.0).is_greedy
    assert not SamplingParams(temperature=0.1).is_greedy
