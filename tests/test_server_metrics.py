"""/metrics: the page parses, the names are the documented ones, and the counters move by what the test sent."""
from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from glmserve.engine.entrypoints.metrics import ServerMetrics

from .server_fixtures import client, parse_metrics, session_server, shared_server  # noqa: F401 (fixtures)

DOCS = Path(__file__).resolve().parent.parent / "README.md"


def delta(after: dict, before: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


def test_counters_match_what_was_sent(client, shared_server):
    before = parse_metrics(shared_server.metrics_text())
    prompts = ["one", "two words", "three words here"]
    prompt_lens = [len(client.tokenize(p)) for p in prompts]
    for p in prompts:
        list(client.generate(p, max_tokens=5, min_tokens=5))
    # min_tokens: no stop token (eos, or a chat's <|user|> / <|observation|>) can end a sample early
    chat = list(client.chat([{"role": "user", "content": "hi"}], max_tokens=4, min_tokens=4, stream=False))
    with pytest.raises(grpc.RpcError):
        list(client.generate("bad", temperature=-1))
    after = parse_metrics(shared_server.metrics_text())

    chat_prompt = chat[-1].usage.prompt_tokens
    assert delta(after, before, "glmserve_prompt_tokens_total") == sum(prompt_lens) + chat_prompt
    assert delta(after, before, "glmserve_generation_tokens_total") == 3 * 5 + 4
    assert delta(after, before, "glmserve_request_success_total", finish_reason="length") == 4
    assert delta(after, before, "glmserve_grpc_requests_total", method="Generate", code="OK") == 3
    assert delta(after, before, "glmserve_grpc_requests_total", method="Chat", code="OK") == 1
    assert delta(after, before, "glmserve_grpc_requests_total", method="Generate", code="INVALID_ARGUMENT") == 1
    assert delta(after, before, "glmserve_grpc_requests_total", method="Tokenize", code="OK") == 3
    for histogram in ("glmserve_time_to_first_token_seconds", "glmserve_e2e_request_latency_seconds",
                      "glmserve_request_queue_time_seconds", "glmserve_request_prompt_tokens",
                      "glmserve_request_generation_tokens"):
        assert delta(after, before, histogram + "_count") == 4, histogram
    assert delta(after, before, "glmserve_inter_token_latency_seconds_count") == 3 * (5 - 1) + (4 - 1)
    assert delta(after, before, "glmserve_request_generation_tokens_sum") == 3 * 5 + 4
    assert delta(after, before, "glmserve_iteration_tokens_count") >= 5 + 4
    # Each prompt is computed once (too short for a prefix-cache hit), then every sampled token but the last.
    assert delta(after, before, "glmserve_iteration_tokens_sum") == sum(prompt_lens) + chat_prompt + 3 * 4 + 3
    assert after[("glmserve_num_requests_running", ())] == 0
    assert after[("glmserve_num_requests_waiting", ())] == 0
    assert after[("glmserve_kv_cache_usage_ratio", ())] == 0
    info = next(k for k in after if k[0] == "glmserve_model_info")
    assert ("model", "glm-tiny") in info[1]
    assert any(k[0] == "glmserve_cache_config_info" for k in after)


def test_gauges_follow_a_running_request(client, shared_server):
    stream = client.generate("hello", max_tokens=3000, ignore_eos=True)
    next(stream)
    next(stream)
    page = parse_metrics(shared_server.metrics_text())
    assert page[("glmserve_num_requests_running", ())] == 1
    assert page[("glmserve_kv_cache_usage_ratio", ())] > 0
    stream.close()


def test_every_metric_is_documented():
    suffix = {"counter": "_total", "info": "_info"}   # what prometheus_client appends on the page
    documented = DOCS.read_text()
    for family in ServerMetrics().registry.collect():
        name = family.name + suffix.get(family.type, "")
        assert re.search(rf"`{name}[`{{]", documented), f"{name} is missing from the README"
