"""The structured-output benchmarks: ``glmserve-bench structured`` (in one process, glm-tiny here) and
``glmserve-bench serve --structured`` against the shared gRPC server."""
from __future__ import annotations

import asyncio
import json
import re

import pytest

pytest.importorskip("xgrammar")

from glmserve.bench import cli  # noqa: E402
from glmserve.bench.serve.command import BenchConfig, benchmark  # noqa: E402
from glmserve.bench.serve.datasets import IntRange  # noqa: E402
from glmserve.bench.serve.report import result_json  # noqa: E402
from glmserve.bench.serve.structured_arg import parse_structured  # noqa: E402

from .server_fixtures import session_server, shared_server  # noqa: E402,F401


def test_structured_bench_reports_both_kinds_and_compile_times(tmp_path, capsys):
    out = tmp_path / "results" / "structured.json"   # the folder is made
    assert cli.main(["structured", "--model", "glm-tiny", "--batch", "4", "--prompt-len", "8", "--output-len", "6",
                     "--rounds", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["batch"] == 4 and len(data["none_tokens_per_s"]) == len(data["constrained_tokens_per_s"]) == 1
    assert data["none_median"] > 0 and data["constrained_median"] > 0
    assert data["loss"] == pytest.approx(1 - data["constrained_median"] / data["none_median"], abs=1e-3)
    assert set(data["grammar_ms_per_step"]) == {"fill", "mask", "advance"}
    assert all(v > 0 for v in data["grammar_ms_per_step"].values()) and 0 < data["grammar_share"] < 1
    names = [c["schema"] for c in data["compile"]]
    assert "ChatGLM3 tool call (2 tools)" in names and len(names) == 5
    for entry in data["compile"]:   # a cached compile is a lookup: no compile at all
        assert entry["cold_ms"] > 0 and entry["cached_us"] > 0
    text = capsys.readouterr().out
    assert "constrained" in text and "loss" in text and "cold ms" in text


def test_structured_bench_refuses_bad_arguments(tmp_path, capsys):
    assert cli.main(["structured", "--model", "glm-tiny", "--batch", "0"]) == 2
    assert "--batch must be at least 1" in capsys.readouterr().err
    assert cli.main(["structured", "--model", "glm-tiny", "--schema", str(tmp_path / "missing.json")]) == 2
    assert "cannot read --schema" in capsys.readouterr().err


def test_parse_structured(tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text('{"type": "object"}')
    grammar = tmp_path / "g.ebnf"
    grammar.write_text('root ::= "a"')
    assert parse_structured(f"json_schema:{schema}") == {"json_schema": '{"type": "object"}'}
    assert parse_structured(f"grammar:{grammar}") == {"grammar": 'root ::= "a"'}
    assert parse_structured("regex:a:b+") == {"regex": "a:b+"}
    assert parse_structured("choice:yes,no") == {"choice": ["yes", "no"]}
    assert parse_structured("json_object") == {"json_object": True}
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    for text, words in [("yaml:x", "kind must be"), ("regex", "needs a value"), ("json_object:1", "no value"),
                        (f"json_schema:{tmp_path / 'missing'}", "cannot read"), (f"json_schema:{bad}", "not JSON")]:
        with pytest.raises(ValueError, match=words):
            parse_structured(text)


def test_serve_bench_sends_structured_requests(shared_server, tmp_path):
    """Every request is constrained; the run completes and each streamed reply (kept in the harness's record of
    the request) follows the regex."""
    from glmserve.bench.serve.grpc_backend import GrpcBackend
    replies = []
    original = GrpcBackend.send

    async def recording_send(*args, **kwargs):
        record = await original(*args, **kwargs)
        replies.append(record.reply)
        return record
    GrpcBackend.send = recording_send
    try:
        config = BenchConfig(target=shared_server.target, num_prompts=8, input_len=IntRange(8, 16),
                             output_len=IntRange(24, 24), temperature=1.0, progress=False,
                             structured=parse_structured(r"regex:[a-z]{2,5}-\d{3}"))
        (result,) = asyncio.run(benchmark(config))
    finally:
        GrpcBackend.send = original
    data = result_json(result)
    assert (data["completed"], data["failed"]) == (8, 0)
    assert len(replies) == 8 and all(re.fullmatch(r"[a-z]{2,5}-\d{3}", r) for r in replies), replies
    assert data["total_output_tokens"] < 8 * 24   # each ended when its grammar was complete
