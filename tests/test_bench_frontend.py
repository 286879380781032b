"""``glmserve-bench frontend`` end to end on a small setting: every mode runs, the table and the JSON come out."""
from __future__ import annotations

import json
import os

import pytest

from glmserve.bench import frontend

pytestmark = pytest.mark.subprocess


def test_frontend_benchmark_runs_every_mode(tmp_path, capsys):
    out = tmp_path / "results" / "frontend.json"   # a folder that does not exist yet: the benchmark makes it
    cores = os.sched_getaffinity(0)
    assert frontend.main(["--concurrency", "1,4", "--max-tokens", "4", "--prompt-len", "8", "--rounds", "2",
                          "--min-streams", "2", "--out", str(out)]) == 0
    assert os.sched_getaffinity(0) == cores       # the benchmark binds itself to the frontend's cores, then back
    result = json.loads(out.read_text())
    rows = {(r["mode"], r["concurrency"]): r for r in result["results"]}
    assert set(rows) == {(mode, c) for mode in ("engine", "grpc", "http") for c in (1, 4)}
    for r in rows.values():
        assert r["tokens"] == 4 * max(2, r["concurrency"])     # at least --min-streams streams a run
        assert 1 <= r["tokens_per_message"] <= 4
        assert r["tokens_per_s"] > 0 and 0 <= r["chunk_latency_p50_ms"] <= r["chunk_latency_p99_ms"]
        assert r["frontend_cpu_ms_per_ktok"] > 0
        assert (r["client_cpu_ms_per_ktok"] is None) == (r["mode"] == "engine")
    assert [(c["mode"], c["concurrency"]) for c in result["cost"]] == [("grpc", 1), ("grpc", 4), ("http", 1),
                                                                         ("http", 4)]
    assert all(c["throughput_ratio"] > 0 for c in result["cost"])
    table = capsys.readouterr().out
    assert "added p50 ms" in table and "grpc" in table and "http" in table
    assert all(len(c["round_ratios"]) == 2 for c in result["cost"])


@pytest.mark.parametrize("flags, message", [
    (["--rounds", "0"], "--rounds must be >= 1, got 0"),
    (["--min-streams", "0"], "--min-streams must be >= 1, got 0"),
    (["--concurrency", "1,0"], "--concurrency: every level must be >= 1"),
    (["--concurrency", "1,x"], "--concurrency: expected comma-separated numbers"),
    (["--modes", "grpc"], "--modes: expected engine and any of grpc, http"),
    (["--max-stream-messages-per-s", "-1"], "--max-stream-messages-per-s must be >= 0, got -1.0"),
])
def test_bad_settings_exit_2_naming_the_flag_before_anything_starts(flags, message, capsys):
    assert frontend.main(flags) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
