"""``glmserve-bench grpc-pacing`` and ``glmserve-bench startup-heap`` end to end on small settings."""
from __future__ import annotations

import json

import pytest

from glmserve.bench import grpc_pacing, startup_heap

pytestmark = pytest.mark.subprocess


def test_grpc_pacing_runs_every_pattern(tmp_path, capsys):
    out = tmp_path / "pacing.json"
    assert grpc_pacing.main(["--streams", "2", "--messages", "3", "--interval-ms", "5", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["pattern"] for r in rows] == list(grpc_pacing.PATTERNS)
    for r in rows:
        assert r["messages"] == 6 and r["server_cpu_us_per_message"] > 0 and r["client_cpu_us_per_message"] > 0
    paced = {r["pattern"]: r["wall_s"] for r in rows}
    assert paced["staggered"] >= 0.015 and paced["aligned"] >= 0.010     # three messages, 5 ms apart at least
    assert "aligned" in capsys.readouterr().out


def test_grpc_pacing_refuses_bad_settings(capsys):
    assert grpc_pacing.main(["--streams", "0"]) == 2
    err = capsys.readouterr().err
    assert "--streams and --messages must be >= 1" in err and "Traceback" not in err


def test_startup_heap_compares_the_heap_as_is_and_frozen(tmp_path):
    import gc
    out = tmp_path / "heap.json"
    assert startup_heap.main(["--streams", "4", "--max-tokens", "4", "--rounds", "1", "--out", str(out)]) == 0
    as_is, frozen = json.loads(out.read_text())["results"]
    assert not as_is["frozen"] and frozen["frozen"]
    assert as_is["tracked_objects"] > 10_000 and frozen["tracked_objects"] < as_is["tracked_objects"] // 10
    assert all(len(r["slowest_step_ms"]) == 1 and r["slowest_step_ms"][0] >= r["median_step_ms"][0] > 0
               for r in (as_is, frozen))
    assert gc.get_freeze_count() == 0          # the benchmark leaves the heap as it found it


def test_startup_heap_refuses_bad_settings(capsys):
    assert startup_heap.main(["--rounds", "0"]) == 2
    err = capsys.readouterr().err
    assert "--rounds must be >= 1" in err and "Traceback" not in err
