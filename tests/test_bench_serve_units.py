"""The serving benchmark's pure parts: metrics on hand-made timings, arrival schedules, datasets, chaos plans,
server-metric deltas and the report formats. No server needed."""
from __future__ import annotations

import argparse
import csv
import io
import math
import statistics

import pytest

from glmserve.bench.serve.arrivals import arrival_offsets, parse_rates
from glmserve.bench.serve.chaos import KINDS, ChaosReport, plan_chaos, status_counts
from glmserve.bench.serve.client import RequestRecord
from glmserve.bench.serve.datasets import (SHAREGPT_SAMPLE, Exchange, IntRange, load_sharegpt, multiturn_prompts,
                                           random_prompts, sharegpt_prompts)
from glmserve.bench.serve.metrics import compute_metrics, latency_stats, parse_slo, percentile
from glmserve.bench.serve.report import RunResult, csv_text, result_json, run_table
from glmserve.bench.serve.server_stats import Counters, Peaks, figures, parse_counters
from glmserve.engine.core.sampling_params import SamplingParams, SamplingParamsError


# ---- metrics ------------------------------------------------------------------------------------------------------
def record(start, chunks, end, prompt_len=10, code="OK", chaos=None) -> RequestRecord:
    """``chunks``: [(arrival time, tokens)]."""
    return RequestRecord("r", chaos, start, end, [t for t, _ in chunks], [n for _, n in chunks], code,
                         prompt_len=prompt_len)


# TTFT 100 / 300 / 50 ms; E2EL 400 / 600 / 50 ms; TPOT 150 / 150 / -; ITL 100, 200 / 200 / -.
RECORDS = [
    record(0.0, [(0.1, 1), (0.2, 1), (0.4, 1)], 0.4, prompt_len=10),
    record(1.0, [(1.3, 1), (1.5, 2)], 1.6, prompt_len=20),
    record(2.0, [(2.05, 1)], 2.05, prompt_len=0),
    record(3.0, [], 3.2, code="UNAVAILABLE"),
    record(3.0, [(3.1, 1)], 3.2, code="CANCELLED", chaos="cancel"),   # chaos: reported elsewhere
]


def test_percentile_interpolates_linearly():
    assert percentile([1.0, 2.0, 3.0, 4.0], 90) == pytest.approx(3.7)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([5.0], 99) == 5.0
    assert percentile([], 50) == 0.0


def test_latency_stats_by_hand():
    s = latency_stats([0.1, 0.3, 0.05])
    assert (s.mean, s.median, s.p90, s.p99, s.count) == pytest.approx((150, 100, 260, 296, 3))
    assert s.std == pytest.approx(math.sqrt((100 ** 2 + 50 ** 2 + 150 ** 2) / 3))
    assert latency_stats([]).mean == 0.0


def test_metrics_on_synthetic_timings():
    m = compute_metrics(RECORDS, duration=4.0, slos_ms={})
    assert (m.completed, m.failed, m.errors) == (3, 1, {"UNAVAILABLE": 1})
    assert (m.total_input_tokens, m.total_output_tokens) == (30, 7)
    assert (m.request_throughput, m.output_throughput, m.total_token_throughput) == pytest.approx((0.75, 1.75, 9.25))
    assert m.request_goodput is None
    assert (m.ttft.mean, m.ttft.median, m.ttft.p99) == pytest.approx((150, 100, 296))
    assert (m.tpot.mean, m.tpot.std, m.tpot.count) == pytest.approx((150, 0, 2))    # one-token request: no TPOT
    assert (m.itl.mean, m.itl.median, m.itl.count) == pytest.approx((500 / 3, 200, 3))   # a 2-token chunk: one gap
    assert (m.e2el.mean, m.e2el.median) == pytest.approx((350, 400))


@pytest.mark.parametrize("slos, good", [
    ({"ttft": 200}, 2),                  # 100 and 50 ms pass, 300 fails
    ({"tpot": 100}, 1),                  # both 150 ms fail; the one-token request has no TPOT and passes
    ({"ttft": 200, "e2el": 100}, 1),     # every SLO must hold: the first request's 400 ms E2EL fails
    ({"ttft": 300.01, "tpot": 150.01, "e2el": 600.01}, 3),   # just above each worst value
])
def test_goodput_counts_requests_meeting_every_slo(slos, good):
    assert compute_metrics(RECORDS, duration=4.0, slos_ms=slos).request_goodput == pytest.approx(good / 4)


def test_parse_slo():
    assert parse_slo("ttft:500") == ("ttft", 500.0)
    for bad in ("itl:5", "ttft", "ttft:-1", "ttft:x", "ttft:nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_slo(bad)


# ---- arrivals -----------------------------------------------------------------------------------------------------
def gaps(offsets):
    return [b - a for a, b in zip(offsets, offsets[1:])]


def test_poisson_arrivals_have_the_rate_and_exponential_gaps():
    offsets = arrival_offsets(20000, rate=5.0, burstiness=1.0, seed=0)
    g = gaps(offsets)
    assert offsets[0] == 0.0 and all(x >= 0 for x in g)
    assert statistics.fmean(g) == pytest.approx(0.2, rel=0.03)
    assert statistics.pstdev(g) / statistics.fmean(g) == pytest.approx(1.0, rel=0.05)   # exponential: CV 1
    # A Poisson process: arrivals per second have variance equal to their mean.
    counts = [0] * int(offsets[-1])
    for t in offsets:
        if t < len(counts):
            counts[int(t)] += 1
    assert statistics.pvariance(counts) / statistics.fmean(counts) == pytest.approx(1.0, abs=0.15)


@pytest.mark.parametrize("burstiness", [0.25, 4.0])
def test_gamma_burstiness_keeps_the_rate_and_sets_the_spread(burstiness):
    g = gaps(arrival_offsets(20000, rate=10.0, burstiness=burstiness, seed=1))
    assert statistics.fmean(g) == pytest.approx(0.1, rel=0.05)
    assert statistics.pstdev(g) / statistics.fmean(g) == pytest.approx(1 / math.sqrt(burstiness), rel=0.07)


def test_arrivals_infinite_rate_and_determinism():
    assert arrival_offsets(4, math.inf, 1.0, 0) == [0.0] * 4
    assert arrival_offsets(50, 3.0, 0.5, 7) == arrival_offsets(50, 3.0, 0.5, 7)
    assert arrival_offsets(50, 3.0, 0.5, 7) != arrival_offsets(50, 3.0, 0.5, 8)


def test_parse_rates():
    assert parse_rates("inf") == [math.inf]
    assert parse_rates("2,4.5,inf") == [2.0, 4.5, math.inf]
    for bad in ("", "0", "-1", "two", "nan"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_rates(bad)


# ---- datasets -----------------------------------------------------------------------------------------------------
def test_int_range():
    assert IntRange.parse("32:256") == IntRange(32, 256) and IntRange.parse("7") == IntRange(7, 7)
    for bad in ("0:4", "9:3", "a:b"):
        with pytest.raises(argparse.ArgumentTypeError):
            IntRange.parse(bad)


def test_random_prompts_stay_in_their_ranges():
    prompts = random_prompts(200, IntRange(4, 9), IntRange(2, 5), vocab_size=50, seed=3)
    assert prompts == random_prompts(200, IntRange(4, 9), IntRange(2, 5), vocab_size=50, seed=3)
    assert {len(p.prompt_token_ids) for p in prompts} == set(range(4, 10))
    assert {p.output_len for p in prompts} == set(range(2, 6))
    assert all(3 <= t < 50 for p in prompts for t in p.prompt_token_ids)
    assert all(p.prompt_len == len(p.prompt_token_ids) and p.messages is None for p in prompts)


def test_sharegpt_sample_loads_first_exchanges_and_skips_the_rest():
    exchanges = load_sharegpt(SHAREGPT_SAMPLE)
    assert len(exchanges) == 20   # the sample's two malformed conversations are skipped
    assert exchanges[2] == Exchange("Give me three names for a grey cat.", "Smoke, Pebble and Earl Grey.")


def test_sharegpt_prompts_cap_filter_and_repeat():
    exchanges = [Exchange("a", "x"), Exchange("b", "y"), Exchange("c", "z")]
    prompts = sharegpt_prompts(exchanges, prompt_lens=[10, 20, 95], gpt_lens=[300, 4, 10], num=7,
                               max_output_len=50, max_model_len=100, seed=0)
    assert len(prompts) == 7
    by_text = {p.messages[0][1]: (p.prompt_len, p.output_len) for p in prompts}
    assert by_text == {"a": (10, 50), "b": (20, 4)}   # "c" needs 95 + 10 > 100 tokens
    with pytest.raises(ValueError, match="fits"):
        sharegpt_prompts(exchanges, [200] * 3, [1] * 3, 2, 50, 100, 0)


def test_load_sharegpt_errors(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_sharegpt(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{", encoding="utf-8")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sharegpt(tmp_path / "bad.json")
    (tmp_path / "none.json").write_text('[{"conversations": []}]', encoding="utf-8")
    with pytest.raises(ValueError, match="no human -> gpt"):
        load_sharegpt(tmp_path / "none.json")


def test_multiturn_prompts_share_a_system_prompt_and_go_round_by_round():
    prompts = multiturn_prompts(3, 2, system_words=10, turn_words=IntRange(2, 4), output_len=IntRange(5, 5), seed=0)
    assert [(p.session, p.turn) for p in prompts] == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    systems = {p.messages[0] for p in prompts[:3]}
    assert len(systems) == 1 and next(iter(systems))[0] == "system"
    assert all([role for role, _ in p.messages] == ["user"] for p in prompts[3:])
    assert all(p.output_len == 5 for p in prompts)


# ---- chaos --------------------------------------------------------------------------------------------------------
def test_chaos_plan_takes_the_fraction_and_shares_it_between_kinds():
    plan = plan_chaos(100, 0.2, vocab_size=64, max_model_len=128, seed=0)
    chosen = [c for c in plan if c is not None]
    assert len(chosen) == 20
    assert {k: sum(c.kind == k for c in chosen) for k in KINDS} == {k: 5 for k in KINDS}
    assert plan_chaos(10, 0.0, 64, 128, 0) == [None] * 10
    for c in chosen:
        if c.kind == "overlong":
            assert len(c.prompt_token_ids) > 128
        elif c.kind == "deadline":
            assert 0 < c.timeout_s < 1
        elif c.kind == "cancel":
            assert c.cancel_after >= 1
        else:   # every invalid override is one the engine refuses
            with pytest.raises(SamplingParamsError):
                SamplingParams(**dict(c.sampling)).validate(vocab_size=64)


def test_status_counts_by_kind():
    outcomes = [("cancel", "CANCELLED"), ("invalid", "INVALID_ARGUMENT"), ("cancel", "OK"), ("cancel", "CANCELLED")]
    assert status_counts(outcomes) == {"cancel": {"CANCELLED": 2, "OK": 1}, "invalid": {"INVALID_ARGUMENT": 1}}


# ---- server metrics -----------------------------------------------------------------------------------------------
METRICS_PAGE = """\
# TYPE glmserve_kv_cache_usage_ratio gauge
glmserve_kv_cache_usage_ratio 0.25
# TYPE glmserve_num_preemptions counter
glmserve_num_preemptions_total 3.0
# TYPE glmserve_prefix_cache_queries counter
glmserve_prefix_cache_queries_total 1000.0
# TYPE glmserve_prefix_cache_hits counter
glmserve_prefix_cache_hits_total 400.0
# TYPE glmserve_grpc_requests counter
glmserve_grpc_requests_total{code="OK",method="Generate"} 7.0
"""


def test_server_figures_are_deltas_over_the_run():
    before = Counters(0.0, 1.0, 200.0, 100.0)
    after = parse_counters(METRICS_PAGE)
    assert after == Counters(0.25, 3.0, 1000.0, 400.0)
    f = figures(Peaks(0.5, 9, 2), before, after)
    assert (f.kv_cache_usage_peak, f.num_requests_running_peak, f.num_requests_waiting_peak) == (0.5, 9, 2)
    assert (f.kv_cache_usage_end, f.num_preemptions, f.prefix_cache_queries, f.prefix_cache_hits) == (0.25, 2, 800, 300)
    assert f.prefix_cache_hit_rate == pytest.approx(300 / 800)
    assert figures(Peaks(), before, before).prefix_cache_hit_rate is None   # nothing looked up
    assert figures(Peaks(), None, None).num_preemptions is None             # no --metrics-url


# ---- report -------------------------------------------------------------------------------------------------------
VLLM_KEYS = ["completed", "total_input_tokens", "total_output_tokens", "request_throughput", "output_throughput",
             "total_token_throughput", "request_goodput", "duration"] + [
    f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "std", "p90", "p99")]


def make_result(rate: float, chaos: ChaosReport | None = None) -> RunResult:
    return RunResult("glm-tiny", "random", 4, rate, 1.0, None, {"ttft": 200.0},
                     compute_metrics(RECORDS, 4.0, {"ttft": 200.0}), figures(Peaks(), None, None), chaos)


def test_result_json_has_vllm_keys_and_no_infinity():
    data = result_json(make_result(math.inf, ChaosReport({"cancel": {"CANCELLED": 1}})))
    assert set(VLLM_KEYS) <= set(data)
    assert data["request_rate"] == "inf" and data["errors"] == {"UNAVAILABLE": 1}
    assert data["median_ttft_ms"] == pytest.approx(100) and data["request_goodput"] == pytest.approx(0.5)
    assert data["chaos"]["requests"] == 1 and data["chaos"]["server_ok"] is False   # no health check: not OK
    assert "server" in data and "kv_cache_usage_peak" in data["server"]
    assert "TTFT" in run_table(make_result(2.0)) and "Chaos" in run_table(make_result(2.0, ChaosReport()))


def test_csv_has_a_row_per_rate():
    rows = list(csv.DictReader(io.StringIO(csv_text([make_result(2.0), make_result(math.inf)]))))
    assert [r["request_rate"] for r in rows] == ["2.0", "inf"]
    assert rows[0]["errors_UNAVAILABLE"] == "1" and "server_kv_cache_usage_peak" in rows[0]
    assert set(VLLM_KEYS) <= set(rows[0])
