"""The serving benchmark against a live gRPC server (the shared in-process glm-tiny server, on loopback)."""
from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import math

import pytest

from glmserve.bench import cli
from glmserve.bench.serve.command import BenchConfig, benchmark, build_prompts
from glmserve.bench.serve.chaos import check_idle
from glmserve.bench.serve.datasets import IntRange, multiturn_prompts, random_prompts
from glmserve.bench.serve.report import LATENCIES, result_json
from glmserve.bench.serve.runner import Planned, run_plan
from glmserve.bench.serve.server_stats import Peaks, poll_peaks
from glmserve.engine.entrypoints.grpc.client import AsyncGenerationClient

from .server_fixtures import session_server, shared_server  # noqa: F401


def bench_config(server, **kwargs) -> BenchConfig:
    return BenchConfig(target=server.target, metrics_url=f"http://127.0.0.1:{server.server.metrics_port}/metrics",
                       progress=False, **kwargs)


def test_random_run_reports_what_was_requested(shared_server):
    config = bench_config(shared_server, num_prompts=16, input_len=IntRange(8, 64), output_len=IntRange(4, 16),
                          request_rates=[40.0], slos_ms={"ttft": 60_000.0, "e2el": 60_000.0}, num_warmups=2)
    (result,) = asyncio.run(benchmark(config))
    data = result_json(result)
    # The run's prompts are the random dataset of its seed: with ignore_eos every output length is exact.
    sent = random_prompts(16, config.input_len, config.output_len, shared_server.engine.tokenizer.vocab_size, 0)
    assert (data["completed"], data["failed"], data["errors"]) == (16, 0, {})
    assert data["total_input_tokens"] == sum(p.prompt_len for p in sent)
    assert data["total_output_tokens"] == sum(p.output_len for p in sent)
    assert data["duration"] > 0
    assert data["request_throughput"] == pytest.approx(16 / data["duration"])
    assert data["request_goodput"] == pytest.approx(data["request_throughput"])   # SLOs nobody misses
    assert data["output_throughput"] == pytest.approx(data["total_output_tokens"] / data["duration"])
    for name in LATENCIES:
        assert 0 < data[f"median_{name}_ms"] <= data[f"p90_{name}_ms"] <= data[f"p99_{name}_ms"]
        assert data[f"mean_{name}_ms"] > 0 and data[f"std_{name}_ms"] >= 0
    assert data["p99_ttft_ms"] <= data["p99_e2el_ms"] and data["median_itl_ms"] < data["median_e2el_ms"]
    server = data["server"]
    # Peaks are GetLoad samples: a run this short can fall between two of them, so only the bounds are certain here
    # (test_poller_sees_a_request_in_flight checks that samples land).
    assert 0 <= server["num_requests_running_peak"] <= shared_server.engine.config.scheduler.max_num_seqs
    assert server["num_preemptions"] == 0
    assert server["prefix_cache_queries"] >= data["total_input_tokens"] // 2
    assert server["kv_cache_usage_end"] == 0.0


def test_chaos_leaves_the_server_healthy_and_the_counts_add_up(shared_server):
    config = bench_config(shared_server, num_prompts=24, input_len=IntRange(8, 32), output_len=IntRange(4, 8),
                          request_rates=[math.inf], chaos=0.5, seed=5)
    (result,) = asyncio.run(benchmark(config))
    chaos = result.chaos
    assert chaos.health.ok, chaos.health
    assert chaos.health.serving == "SERVING" and chaos.health.load.num_free_blocks == chaos.health.load.num_total_blocks
    assert chaos.total == 12 and result.num_prompts == 12 and result.metrics.completed == 12
    assert {kind: sum(codes.values()) for kind, codes in chaos.counts.items()} == {
        "cancel": 3, "deadline": 3, "invalid": 3, "overlong": 3}
    assert chaos.counts["cancel"] == {"CANCELLED": 3}
    assert chaos.counts["invalid"] == chaos.counts["overlong"] == {"INVALID_ARGUMENT": 3}
    assert set(chaos.counts["deadline"]) <= {"DEADLINE_EXCEEDED", "OK"}
    assert result.passed and result_json(result)["chaos"]["server_ok"] is True


def test_idle_check_fails_while_work_is_running(shared_server):
    async def scenario():
        async with AsyncGenerationClient(shared_server.target) as client:
            stream = client.generate(prompt_token_ids=[5] * 16, max_tokens=400, min_tokens=400, ignore_eos=True)
            await stream.__anext__()   # generating now
            check = await check_idle(client, settle_s=0.1)
            await stream.aclose()      # cancels the call
            return check
    check = asyncio.run(scenario())
    assert not check.ok and check.serving == "SERVING" and check.load.num_running == 1


def test_poller_sees_a_request_in_flight(shared_server):
    async def scenario():
        async with AsyncGenerationClient(shared_server.target) as client:
            stream = client.generate(prompt_token_ids=[5] * 16, max_tokens=400, min_tokens=400, ignore_eos=True)
            await stream.__anext__()   # generating now, with hundreds of tokens to go
            peaks = Peaks()
            poller = asyncio.create_task(poll_peaks(client, peaks, interval=0.01))
            await asyncio.sleep(0.05)
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller
            await stream.aclose()
            return peaks
    peaks = asyncio.run(scenario())
    assert peaks.num_running == 1 and peaks.num_waiting == 0 and peaks.kv_cache_usage > 0


def test_multiturn_sessions_grow_their_history_and_hit_the_prefix_cache(shared_server):
    prompts = multiturn_prompts(3, 3, system_words=60, turn_words=IntRange(4, 8), output_len=IntRange(4, 8), seed=9)

    async def play():
        async with AsyncGenerationClient(shared_server.target) as client:
            plan = [Planned(i, p, 0.0) for i, p in enumerate(prompts)]
            return await run_plan(client, plan, temperature=0.0, max_concurrency=2)
    records = asyncio.run(play()).records
    assert all(r.ok and r.output_len == p.output_len for r, p in zip(records, prompts))
    for user in range(3):   # each turn's prompt holds the previous turn's prompt and reply
        lens = [r.prompt_len for r, p in zip(records, prompts) if p.session == user]
        assert lens[0] < lens[1] < lens[2]

    config = bench_config(shared_server, dataset="multiturn", num_prompts=8, turns=2, system_words=80,
                          output_len=IntRange(4, 8))
    (result,) = asyncio.run(benchmark(config))
    assert result.metrics.completed == 8
    assert result.server.prefix_cache_hit_rate > 0.3   # the system prompt and earlier turns are reused


def test_cli_sharegpt_sweep_writes_json_csv_and_plot(shared_server, tmp_path, capsys):
    # Folders that do not exist yet: the benchmark makes them.
    out = {ext: tmp_path / "results" / ext / f"result.{ext}" for ext in ("json", "csv", "png")}
    code = cli.main(["serve", "--target", shared_server.target, "--dataset", "sharegpt", "--num-prompts", "6",
                     "--sharegpt-max-output-len", "8", "--request-rate", "20,inf", "--goodput", "ttft:60000",
                     "--no-progress", "--result-json", str(out["json"]), "--result-csv", str(out["csv"]),
                     "--plot", str(out["png"])])
    assert code == 0
    printed = capsys.readouterr().out
    assert "sharegpt @ 20 req/s" in printed and "sharegpt @ inf req/s" in printed and "TPOT p99" in printed
    runs = json.loads(out["json"].read_text())
    assert [r["request_rate"] for r in runs] == [20.0, "inf"]

    async def expected_output_tokens(seed):
        async with AsyncGenerationClient(shared_server.target) as client:
            config = BenchConfig(target="", dataset="sharegpt", num_prompts=6, sharegpt_max_output_len=8)
            return sum(p.output_len for p in await build_prompts(client, config, await client.model_info(), seed))
    for seed, run in enumerate(runs):
        assert run["completed"] == 6 and run["total_output_tokens"] == asyncio.run(expected_output_tokens(seed))
    rows = list(csv.DictReader(out["csv"].open()))
    assert [row["request_rate"] for row in rows] == ["20.0", "inf"]
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_reports_an_unreachable_server(capsys):
    assert cli.main(["serve", "--target", "127.0.0.1:1", "--num-prompts", "1", "--no-progress"]) == 1
    assert "cannot get the model info from 127.0.0.1:1: UNAVAILABLE" in capsys.readouterr().err
