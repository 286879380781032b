"""Sampler: greedy, padding mask, truncation (top-k/top-p/min-p), penalties, min_tokens, seeds, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from glmserve.engine.worker.sampler import Sampler, SamplerOutput, SamplingRow, apply_penalties
from glmserve.engine.core.sampling_params import SamplingParams

# A small stand-in for ChatGLM3's 64798-token vocabulary padded to 65024.
VOCAB, PADDED, EOS = 100, 128, 2


def row(params: SamplingParams | None = None, prompt=(5, 6), output=(), seed: int | None = None) -> SamplingRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params or SamplingParams(), list(prompt), list(output), gen)


def random_logits(batch: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, PADDED, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.fixture
def sampler() -> Sampler:
    return Sampler(vocab_size=VOCAB, eos_token_id=EOS)


def frequencies(sampler: Sampler, logits: torch.Tensor, params: SamplingParams, draws: int) -> torch.Tensor:
    """Empirical token distribution from one batched call of ``draws`` identical unseeded rows."""
    torch.manual_seed(1234)
    out = sampler(logits.expand(draws, -1), [row(params) for _ in range(draws)])
    return torch.bincount(torch.tensor(out.token_ids), minlength=logits.shape[-1]).double() / draws


def four_token_logits(probs: list[float]) -> torch.Tensor:
    logits = torch.full((1, PADDED), -math.inf)
    logits[0, :4] = torch.tensor(probs).log()
    return logits


# ---- greedy and the padding mask ------------------------------------------------------------------------------
def test_greedy_is_argmax_over_the_real_vocab(sampler):
    logits = random_logits(6)
    logits[0, VOCAB + 3] = 100.0  # a padding column with the largest logit must lose anyway
    out = sampler(logits, [row(SamplingParams(temperature=0.0)) for _ in range(6)])
    assert out.token_ids == logits[:, :VOCAB].argmax(-1).tolist()
    assert out.logprobs is None and out.top_logprobs is None


def test_plain_greedy_shortcut_equals_the_full_path(sampler):
    # All-greedy rows without logprobs take a no-copy argmax; asking one row for logprobs forces the full path.
    logits = random_logits(8, seed=3)
    logits[:, VOCAB:] = 100.0
    before = logits.clone()
    fast = sampler(logits, [row(SamplingParams(temperature=0.0)) for _ in range(8)])
    full = sampler(logits, [row(SamplingParams(temperature=0.0, logprobs=0 if i == 0 else None)) for i in range(8)])
    assert fast.token_ids == full.token_ids == logits[:, :VOCAB].argmax(-1).tolist()
    assert torch.equal(logits, before)


def test_caller_logits_unchanged(sampler):
    logits = random_logits(2)
    before = logits.clone()
    sampler(logits, [row(SamplingParams(repetition_penalty=1.5, min_tokens=3)), row()])
    assert torch.equal(logits, before)


def test_padded_ids_never_sampled_at_high_temperature(sampler):
    logits = torch.zeros(512, PADDED)
    logits[:, VOCAB:] = 50.0  # padding columns would win almost every draw if they were not masked
    out = sampler(logits, [row(SamplingParams(temperature=100.0), seed=i % 7 if i % 2 else None) for i in range(512)])
    assert max(out.token_ids) < VOCAB
    assert len(set(out.token_ids)) > 50  # and the real vocabulary is still sampled broadly


def test_tiny_temperature_is_greedy(sampler):
    logits = random_logits(4)
    out = sampler(logits, [row(SamplingParams(temperature=1e-7)) for _ in range(4)])
    assert out.token_ids == logits[:, :VOCAB].argmax(-1).tolist()


def test_mixed_greedy_and_random_rows(sampler):
    logits = random_logits(5)
    rows = [row(SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0, top_k=1)) for i in range(5)]
    out = sampler(logits, rows)
    assert out.token_ids == logits[:, :VOCAB].argmax(-1).tolist()


# ---- truncation ------------------------------------------------------------------------------------------------
def test_top_k_1_equals_greedy(sampler):
    logits = random_logits(16, seed=1)
    out = sampler(logits, [row(SamplingParams(temperature=1.5, top_k=1), seed=i) for i in range(16)])
    assert out.token_ids == logits[:, :VOCAB].argmax(-1).tolist()


def test_tiny_top_p_equals_greedy(sampler):
    logits = random_logits(16, seed=2)
    out = sampler(logits, [row(SamplingParams(temperature=1.5, top_p=1e-6)) for _ in range(16)])
    assert out.token_ids == logits[:, :VOCAB].argmax(-1).tolist()


@pytest.mark.parametrize("params", [SamplingParams(top_k=2), SamplingParams(top_p=0.6), SamplingParams(min_p=0.6)])
def test_truncation_keeps_the_expected_set(sampler, params):
    # probs 0.1 0.2 0.3 0.4: top_k=2, the 0.6 nucleus (0.4 + 0.3 >= 0.6) and min_p 0.6 (>= 0.24) all keep {2, 3},
    # renormalised to 3/7 and 4/7.
    freq = frequencies(sampler, four_token_logits([0.1, 0.2, 0.3, 0.4]), params, 20_000)
    assert freq[0] == 0 and freq[1] == 0 and freq[4:].sum() == 0
    assert abs(freq[2].item() - 3 / 7) < 0.02 and abs(freq[3].item() - 4 / 7) < 0.02


def test_per_row_top_k_in_one_batch(sampler):
    logits = random_logits(1, seed=4)
    ranked = logits[0, :VOCAB].argsort(descending=True).tolist()
    ks = [1, 2, 3, 0] * 100  # interleaved, so each k sits at many positions
    out = sampler(logits.expand(len(ks), -1), [row(SamplingParams(temperature=5.0, top_k=k)) for k in ks])
    seen = {k: {t for t, kk in zip(out.token_ids, ks) if kk == k} for k in (1, 2, 3, 0)}
    assert seen[1] == {ranked[0]} and seen[2] == set(ranked[:2]) and seen[3] == set(ranked[:3])
    assert len(seen[0]) > 10  # top_k = 0 is off


def test_min_p_drops_tokens_below_the_scaled_floor(sampler):
    logits = torch.full((1, PADDED), -math.inf)
    logits[0, :3] = torch.tensor([0.5, 0.3, 0.2]).log()
    # floor = 0.5 * 0.5 = 0.25: token 2 (0.2) is out, token 1 (0.3) stays.
    freq = frequencies(sampler, logits, SamplingParams(min_p=0.5), 5_000)
    assert freq[2] == 0 and freq[0] > 0.5 and freq[1] > 0.3


def test_rows_with_and_without_truncation_share_a_batch(sampler):
    logits = random_logits(3, seed=3)
    rows = [row(SamplingParams(top_k=1), seed=1), row(SamplingParams(top_p=1e-6), seed=2), row(seed=3)]
    out = sampler(logits, rows)
    alone = sampler(logits[2:], [row(seed=3)])
    assert out.token_ids[:2] == logits[:2, :VOCAB].argmax(-1).tolist()
    assert out.token_ids[2] == alone.token_ids[0]


# ---- distribution ----------------------------------------------------------------------------------------------
def chi_square(freq: torch.Tensor, expected: list[float], draws: int) -> float:
    return sum((freq[i].item() * draws - e * draws) ** 2 / (e * draws) for i, e in enumerate(expected))


def test_sampling_distribution_unseeded(sampler):
    probs = [0.1, 0.2, 0.3, 0.4]
    freq = frequencies(sampler, four_token_logits(probs), SamplingParams(), 20_000)
    assert chi_square(freq, probs, 20_000) < 30  # 3 degrees of freedom: 16.3 at p = 0.001
    assert freq[4:].sum() == 0


def test_sampling_distribution_with_temperature(sampler):
    probs = [0.1, 0.2, 0.3, 0.4]
    scaled = torch.tensor(probs) ** 0.5  # temperature 2 flattens p to p^(1/2), renormalised
    expected = (scaled / scaled.sum()).tolist()
    freq = frequencies(sampler, four_token_logits(probs), SamplingParams(temperature=2.0), 20_000)
    assert chi_square(freq, expected, 20_000) < 30


def test_sampling_distribution_seeded_row_over_steps(sampler):
    probs, steps = [0.1, 0.2, 0.3, 0.4], 2_000
    logits, r = four_token_logits(probs), row(seed=7)
    tokens = torch.tensor([sampler(logits, [r]).token_ids[0] for _ in range(steps)])
    freq = torch.bincount(tokens, minlength=PADDED).double() / steps
    assert chi_square(freq, probs, steps) < 30


# ---- seeds -----------------------------------------------------------------------------------------------------
def test_seeded_row_independent_of_batch_and_position(sampler):
    steps = 40
    params = SamplingParams(temperature=0.9, top_p=0.95)
    alone, in_batch = row(params, seed=42), row(params, seed=42)
    others = [row(SamplingParams(top_k=5), seed=1), row(), row(SamplingParams(temperature=0.0)),
              row(SamplingParams(min_p=0.1, repetition_penalty=1.3), output=[1, 2]), row(seed=99)]
    tokens_alone, tokens_batch = [], []
    for step in range(steps):
        mine = random_logits(1, seed=step, scale=1.0)  # flat enough that the draws differ from argmax
        tokens_alone.append(sampler(mine, [alone]).token_ids[0])
        position = step % (len(others) + 1)  # move the seeded row around the batch
        batch_rows = others[:position] + [in_batch] + others[position:]
        logits = random_logits(len(batch_rows), seed=1000 + step)
        logits[position] = mine[0]
        tokens_batch.append(sampler(logits, batch_rows).token_ids[position])
    assert tokens_alone == tokens_batch
    assert len(set(tokens_alone)) > 10  # really sampling, not argmax


def test_same_seed_same_tokens_different_seed_differs(sampler):
    logits = torch.zeros(1, PADDED)
    runs = {}
    for seed in (1, 1, 2):
        r = row(seed=seed)
        runs.setdefault(seed, []).append([sampler(logits, [r]).token_ids[0] for _ in range(20)])
    assert runs[1][0] == runs[1][1]
    assert runs[1][0] != runs[2][0]


# ---- penalties -------------------------------------------------------------------------------------------------
def test_repetition_penalty_divides_positive_multiplies_negative():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 3.0]])
    r = SamplingRow(SamplingParams(repetition_penalty=2.0), prompt_token_ids=[0, 1], output_token_ids=[2, 2],
                    generator=None)
    apply_penalties(logits, [r])
    assert logits.tolist() == [[1.0, -4.0, 0.5, -1.0, 3.0]]


def test_presence_and_frequency_penalties_use_output_tokens_only():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    r = SamplingRow(SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt_token_ids=[0, 3],
                    output_token_ids=[1, 2, 2, 2], generator=None)
    apply_penalties(logits, [r])
    # token 1: 1 - 0.25*1 - 0.5 = 0.25; token 2: 1 - 0.25*3 - 0.5 = -0.25; prompt-only tokens 0 and 3 untouched.
    assert logits.tolist() == [[1.0, 0.25, -0.25, 1.0]]


def test_negative_presence_penalty_encourages():
    logits = torch.tensor([[0.0, 0.0, 0.0]])
    apply_penalties(logits, [SamplingRow(SamplingParams(presence_penalty=-1.0), [], [1], None)])
    assert logits.tolist() == [[0.0, 1.0, 0.0]]


def test_penalties_per_row_leave_default_rows_alone():
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    rows = [SamplingRow(SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0), [0], [1], None),
            SamplingRow(SamplingParams(), [0], [1], None)]
    apply_penalties(logits, rows)
    assert logits.tolist() == [[1.0, -5.0, 1.0], [2.0, -2.0, 1.0]]


def test_repetition_penalty_changes_the_greedy_choice(sampler):
    logits = torch.zeros(1, PADDED)
    logits[0, 10], logits[0, 11] = 3.0, 2.0
    greedy = SamplingParams(temperature=0.0)
    assert sampler(logits, [row(greedy, prompt=[10])]).token_ids == [10]
    assert sampler(logits, [row(greedy.clone(repetition_penalty=2.0), prompt=[10])]).token_ids == [11]


# ---- min_tokens ------------------------------------------------------------------------------------------------
def test_min_tokens_blocks_eos_and_stop_ids(sampler):
    logits = torch.zeros(1, PADDED)
    logits[0, EOS], logits[0, 50], logits[0, 60], logits[0, 7] = 10.0, 9.0, 8.0, 1.0
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[50, 60])
    assert sampler(logits, [row(params, output=[7, 7])]).token_ids == [7]
    assert sampler(logits, [row(params, output=[7, 7, 7])]).token_ids == [EOS]
    assert sampler(logits, [row(params.clone(ignore_eos=True), output=[7])]).token_ids == [7]


def test_min_tokens_masks_only_rows_below_their_minimum(sampler):
    logits = torch.zeros(2, PADDED)
    logits[:, EOS] = 10.0
    rows = [row(SamplingParams(temperature=0.0, min_tokens=2)), row(SamplingParams(temperature=0.0))]
    assert sampler(logits, rows).token_ids[1] == EOS
    assert sampler(logits, rows).token_ids[0] != EOS


# ---- logprobs --------------------------------------------------------------------------------------------------
def test_logprobs_equal_log_softmax_of_masked_logits(sampler):
    logits = random_logits(3, seed=5)
    rows = [row(SamplingParams(logprobs=3, repetition_penalty=1.7), seed=0), row(),
            row(SamplingParams(temperature=0.0, logprobs=0))]
    out = sampler(logits, rows)
    reference = torch.log_softmax(logits[:, :VOCAB], dim=-1)
    assert isinstance(out, SamplerOutput)
    for i in (0, 2):
        assert out.logprobs[i] == pytest.approx(reference[i, out.token_ids[i]].item(), abs=1e-5)
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    assert out.top_logprobs[2] == []
    values, ids = reference[0].topk(3)
    assert [t for t, _ in out.top_logprobs[0]] == ids.tolist()
    assert [v for _, v in out.top_logprobs[0]] == pytest.approx(values.tolist(), abs=1e-5)


def test_top_logprobs_exclude_padding(sampler):
    logits = random_logits(1)
    out = sampler(logits, [row(SamplingParams(logprobs=20, temperature=0.0))])
    assert len(out.top_logprobs[0]) == 20 and all(t < VOCAB for t, _ in out.top_logprobs[0])
    assert all(math.isfinite(v) for _, v in out.top_logprobs[0])


def test_batch_shape_mismatch_is_rejected(sampler):
    with pytest.raises(ValueError):
        sampler(random_logits(2), [row()])
