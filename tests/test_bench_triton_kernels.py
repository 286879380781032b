"""bench/kernels/triton_kernels.py runs only on a GPU machine, once, unattended: run the same code on the CPU (the
Triton interpreter, small shapes, one call instead of do_bench_cudagraph's graphs) so a shape or bookkeeping bug
shows here, not in the GPU's few minutes. Timings are not checked; what is written is."""
from __future__ import annotations

import json

import pytest
import torch

from glmserve.bench.kernels import triton_kernels as bench

pytestmark = pytest.mark.interpreter


@pytest.fixture
def on_the_cpu(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("runs for real in bench/gpu_check.sh on a GPU")
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "NUM_HEADS", 8)            # a group of 4: small interpreter tiles
    monkeypatch.setattr(bench, "HEAD_DIM", 32)
    monkeypatch.setattr(bench, "GRAPH_MODEL_LEN", 512)
    monkeypatch.setattr(bench, "DECODE_BATCHES", (1, 3))
    monkeypatch.setattr(bench, "DECODE_CONTEXTS", (128,))
    monkeypatch.setattr(bench, "PREFILL_CASES", (("prefill 1x32", 1, 32, 32), ("chunk 3 over 200", 1, 3, 208)))
    monkeypatch.setattr(bench, "TOUCHED_BYTES", 256 * 1024)  # a few replicas, as on the GPU
    calls = []

    def once(fn, count):
        calls.append(count)
        fn()
        return 1.0
    monkeypatch.setattr(bench, "_time_ms", once)
    return calls


def test_every_point_is_measured_checked_and_written(on_the_cpu, tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert bench.main(["--out", str(out), "--peak-gbps", "3350"]) == 0
    result = json.loads(out.read_text())
    assert [(r["batch"], r["context"]) for r in result["decode"]] == [(1, 128), (3, 128)]
    for row in result["decode"]:
        assert set(row["ms"]) == {"eager", "graph", "2/SM", "sdpa"}
        assert row["replicas"] > 1
        assert max(row["max_abs_diff"].values()) < 0.05          # bf16 against SDPA on the same KV
        assert row["splits"]["graph"] >= row["splits"]["eager"]   # sized for the model length
        assert row["predicted_us"]["eager"] > 0
    assert [r["case"] for r in result["prefill"]] == ["prefill 1x32", "chunk 3 over 200"]
    assert all(r["max_abs_diff"] < 0.05 for r in result["prefill"])
    printed = capsys.readouterr().out
    assert printed.count("decode b=") == 2 and "chunk 3 over 200" in printed
    assert on_the_cpu                                          # the timed callables ran


def test_without_a_gpu_it_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
