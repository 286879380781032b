"""``glmserve-bench frontend`` end to end on a small setting: both modes run, the table and the JSON come out."""
from __future__ import annotations

import pytest

import json

from glmserve.bench import frontend

pytestmark = pytest.mark.subprocess


def test_frontend_benchmark_runs_both_modes(tmp_path, capsys):
    out = tmp_path / "results" / "frontend.json"   # a folder that does not exist yet: the benchmark makes it
    assert frontend.main(["--concurrency", "1,4", "--max-tokens", "4", "--prompt-len", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["mode"], r["concurrency"]): r for r in result["results"]}
    assert set(rows) == {("engine", 1), ("engine", 4), ("grpc", 1), ("grpc", 4)}
    for r in rows.values():
        assert r["tokens"] == 4 * r["concurrency"]
        assert r["tokens_per_s"] > 0 and 0 <= r["chunk_latency_p50_ms"] <= r["chunk_latency_p99_ms"]
    assert [c["concurrency"] for c in result["cost"]] == [1, 4]
    table = capsys.readouterr().out
    assert "added p50 ms" in table and "grpc" in table
