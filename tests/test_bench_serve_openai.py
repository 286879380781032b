"""The serving benchmark over the OpenAI backends (``--backend openai|openai-chat``), against the shared server's
HTTP API: the same workloads as over gRPC, the same figures, chaos included."""
from __future__ import annotations

import asyncio
import math

import pytest

from glmserve.bench import cli
from glmserve.bench.serve.command import BenchConfig, benchmark, build_prompts, connect
from glmserve.bench.serve.datasets import IntRange, random_prompts
from glmserve.bench.serve.report import result_json
from glmserve.bench.serve.server_stats import parse_load

from .server_fixtures import session_server, shared_server  # noqa: F401


def bench_config(server, backend: str = "openai", **kwargs) -> BenchConfig:
    return BenchConfig(backend=backend, base_url=server.base_url,
                       metrics_url=f"http://127.0.0.1:{server.server.metrics_port}/metrics", progress=False, **kwargs)


def test_random_over_openai_reports_what_was_requested(shared_server):
    config = bench_config(shared_server, num_prompts=12, input_len=IntRange(8, 48), output_len=IntRange(4, 12),
                          request_rates=[40.0], num_warmups=2)
    (result,) = asyncio.run(benchmark(config))
    data = result_json(result)
    sent = random_prompts(12, config.input_len, config.output_len, shared_server.engine.tokenizer.vocab_size, 0)
    assert (data["backend"], data["model"]) == ("openai", "glm-tiny")
    assert (data["completed"], data["failed"], data["errors"]) == (12, 0, {})
    assert data["total_input_tokens"] == sum(p.prompt_len for p in sent)      # usage.prompt_tokens, as sent
    assert data["total_output_tokens"] == sum(p.output_len for p in sent)     # token ids of every chunk
    for name in ("ttft", "tpot", "itl", "e2el"):
        assert 0 < data[f"median_{name}_ms"] <= data[f"p99_{name}_ms"]
    assert data["server"]["kv_cache_usage_end"] == 0.0 and data["server"]["num_preemptions"] == 0
    assert 0 <= data["server"]["num_requests_running_peak"] <= 64


def test_multiturn_over_openai_chat_reuses_the_prefix_cache(shared_server):
    config = bench_config(shared_server, backend="openai-chat", dataset="multiturn", num_prompts=8, turns=2,
                          system_words=80, output_len=IntRange(4, 8))
    (result,) = asyncio.run(benchmark(config))
    assert result.metrics.completed == 8 and result.metrics.failed == 0
    assert result.server.prefix_cache_hit_rate > 0.3


def test_sharegpt_lengths_are_the_same_over_both_protocols(shared_server):
    config = BenchConfig(dataset="sharegpt", num_prompts=6, sharegpt_max_output_len=8)

    async def prompts(backend_config: BenchConfig):
        backend = connect(backend_config)
        try:
            return await build_prompts(backend, config, await backend.model_info(), seed=3)
        finally:
            await backend.close()
    over_grpc = asyncio.run(prompts(BenchConfig(target=shared_server.target)))
    over_http = asyncio.run(prompts(bench_config(shared_server, backend="openai-chat")))
    assert over_http == over_grpc

    run = bench_config(shared_server, backend="openai-chat", dataset="sharegpt", num_prompts=6,
                       sharegpt_max_output_len=8, seed=3)
    (result,) = asyncio.run(benchmark(run))
    assert result.metrics.completed == 6
    assert result.metrics.total_output_tokens == sum(p.output_len for p in over_grpc)


def test_chaos_over_http_leaves_the_server_healthy(shared_server):
    config = bench_config(shared_server, num_prompts=16, input_len=IntRange(8, 32), output_len=IntRange(4, 8),
                          request_rates=[math.inf], chaos=0.5, seed=5)
    (result,) = asyncio.run(benchmark(config))
    chaos = result.chaos
    assert chaos.health.ok, chaos.health
    assert {kind: sum(codes.values()) for kind, codes in chaos.counts.items()} == {
        "cancel": 2, "deadline": 2, "invalid": 2, "overlong": 2}
    assert chaos.counts["cancel"] == {"CANCELLED": 2}
    assert chaos.counts["invalid"] == chaos.counts["overlong"] == {"400": 2}
    assert set(chaos.counts["deadline"]) <= {"DEADLINE_EXCEEDED", "OK"}
    assert result.passed and result.metrics.completed == 8


@pytest.mark.parametrize("args, message", [
    (["--backend", "openai-chat", "--base-url", "http://127.0.0.1:1/v1"], "random dataset sends token ids"),
    (["--backend", "openai", "--base-url", "http://127.0.0.1:1/v1", "--dataset", "multiturn"], "sends chats"),
    (["--backend", "openai"], "needs --base-url"),
    (["--backend", "grpc"], "needs --target"),
    (["--backend", "openai", "--base-url", "http://127.0.0.1:1/v1", "--chaos", "0.5"], "needs --metrics-url"),
    (["--backend", "openai", "--base-url", "http://127.0.0.1:1/v1"], "cannot get the model list"),
])
def test_cli_errors_are_one_line(capsys, args, message):
    assert cli.main(["serve", *args, "--num-prompts", "1", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


GLMSERVE_PAGE = """\
# TYPE glmserve_num_requests_running gauge
glmserve_num_requests_running 3.0
# TYPE glmserve_num_requests_waiting gauge
glmserve_num_requests_waiting 1.0
# TYPE glmserve_kv_cache_usage_ratio gauge
glmserve_kv_cache_usage_ratio 0.25
# TYPE glmserve_cache_config_info gauge
glmserve_cache_config_info{block_size="16",enable_prefix_caching="true",num_gpu_blocks="64",num_kv_blocks="64"} 1.0
"""
VLLM_PAGE = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 0.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="m"} 0.5
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{block_size="16",num_gpu_blocks="100"} 1.0
"""


def test_load_from_glmserve_and_vllm_metric_pages():
    glm = parse_load(GLMSERVE_PAGE)
    assert (glm.num_running, glm.num_waiting, glm.kv_cache_usage, glm.num_free_blocks, glm.num_total_blocks) == (
        3, 1, 0.25, 48, 64)
    vllm = parse_load(VLLM_PAGE)
    assert (vllm.num_running, vllm.num_waiting, vllm.num_free_blocks, vllm.num_total_blocks) == (2, 0, 50, 100)
    assert parse_load("# TYPE other gauge\nother 1.0\n") is None
