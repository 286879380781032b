"""The structured-output benchmarks: ``glmserve-bench structured`` (in one process, glm-tiny here) and
``glmserve-bench serve --structured`` against the shared server, over gRPC and over its OpenAI-compatible HTTP API."""
from __future__ import annotations

import asyncio
import contextlib
import json
import re

import pytest

pytest.importorskip("xgrammar")

from glmserve.bench import cli  # noqa: E402
from glmserve.bench.serve.command import BenchConfig, benchmark  # noqa: E402
from glmserve.bench.serve.datasets import IntRange  # noqa: E402
from glmserve.bench.serve.report import result_json  # noqa: E402
from glmserve.bench.serve.structured_arg import openai_fields, parse_structured  # noqa: E402

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


@contextlib.contextmanager
def recorded_replies(backend_class):
    """The streamed reply of every request the harness sends through ``backend_class`` (kept in its records)."""
    replies = []
    original = backend_class.send

    async def recording_send(*args, **kwargs):
        record = await original(*args, **kwargs)
        replies.append(record.reply)
        return record
    backend_class.send = recording_send
    try:
        yield replies
    finally:
        backend_class.send = original


def test_serve_bench_sends_structured_requests(shared_server, tmp_path):
    """Every request is constrained; the run completes and each streamed reply follows the regex."""
    from glmserve.bench.serve.grpc_backend import GrpcBackend
    with recorded_replies(GrpcBackend) as replies:
        config = BenchConfig(target=shared_server.target, num_prompts=8, input_len=IntRange(8, 16),
                             output_len=IntRange(24, 24), temperature=1.0, progress=False,
                             structured=parse_structured(r"regex:[a-z]{2,5}-\d{3}"))
        (result,) = asyncio.run(benchmark(config))
    data = result_json(result)
    assert (data["completed"], data["failed"]) == (8, 0)
    assert len(replies) == 8 and all(re.fullmatch(r"[a-z]{2,5}-\d{3}", r) for r in replies), replies
    assert data["total_output_tokens"] < 8 * 24   # each ended when its grammar was complete


def test_serve_bench_sends_structured_requests_over_http(shared_server):
    """``--backend openai``: the regex goes as vLLM's ``structured_outputs``; every completion follows it."""
    from glmserve.bench.serve.openai_backend import OpenAIBackend
    with recorded_replies(OpenAIBackend) as replies:
        config = BenchConfig(backend="openai", base_url=shared_server.base_url, num_prompts=8,
                             input_len=IntRange(8, 16), output_len=IntRange(24, 24), temperature=1.0, progress=False,
                             structured=parse_structured(r"regex:[a-z]{2,5}-\d{3}"))
        (result,) = asyncio.run(benchmark(config))
    data = result_json(result)
    assert (data["backend"], data["completed"], data["failed"]) == ("openai", 8, 0)
    assert len(replies) == 8 and all(re.fullmatch(r"[a-z]{2,5}-\d{3}", r) for r in replies), replies
    assert data["total_output_tokens"] < 8 * 24


def test_serve_bench_sends_a_json_schema_over_openai_chat(shared_server, tmp_path, capsys):
    """``--backend openai-chat --structured json_schema:FILE`` from the command line: the schema goes as OpenAI's
    ``response_format``; every chat reply (multiturn, so replies become the next turns' history) validates."""
    jsonschema = pytest.importorskip("jsonschema")
    from glmserve.bench.serve.openai_backend import OpenAIBackend
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]},
                                               "confidence": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "confidence"]}
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(schema))
    out = tmp_path / "result.json"
    with recorded_replies(OpenAIBackend) as replies:
        assert cli.main(["serve", "--backend", "openai-chat", "--base-url", shared_server.base_url,
                         "--dataset", "multiturn", "--num-prompts", "6", "--turns", "2", "--system-words", "10",
                         "--output-len", "64", "--temperature", "1.0", "--structured", f"json_schema:{path}",
                         "--result-json", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    data = json.loads(out.read_text())
    assert (data["backend"], data["completed"], data["failed"]) == ("openai-chat", 6, 0)
    assert len(replies) == 6
    for reply in replies:
        jsonschema.validate(json.loads(reply), schema)


def test_openai_fields():
    assert openai_fields({"regex": "a+"}) == {"structured_outputs": {"regex": "a+"}}
    assert openai_fields({"choice": ["x", "y"]}) == {"structured_outputs": {"choice": ["x", "y"]}}
    assert openai_fields({"grammar": 'root ::= "a"'}) == {"structured_outputs": {"grammar": 'root ::= "a"'}}
    assert openai_fields({"json_object": True}) == {"response_format": {"type": "json_object"}}
    assert openai_fields({"json_schema": '{"type": "object"}'}) == {"response_format": {
        "type": "json_schema", "json_schema": {"name": "bench", "schema": {"type": "object"}, "strict": True}}}
