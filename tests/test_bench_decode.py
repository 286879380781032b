"""The GPU decode benchmark's whole path, as a CPU smoke run on glm-tiny (no timing is asserted)."""
from __future__ import annotations

import json

import pytest

from glmserve.bench.kernels.decode_throughput import main


def test_decode_benchmark_smoke_on_cpu(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "results" / "decode.json"   # a folder that does not exist yet: the benchmark makes it
    assert main(["--device", "cpu", "--model", "glm-tiny", "--batch-sizes", "1,3", "--context", "40",
                 "--decode-steps", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [p["batch_size"] for p in result["points"]] == [1, 3]
    assert result["weight_bytes"] > 0 and all(p["step_ms"] > 0 and p["hf_step_ms"] is not None
                                              for p in result["points"])
    assert all(p["roofline_ms"] is None for p in result["points"])   # no known peak bandwidth on a CPU


def test_decode_benchmark_without_cuda_is_a_clear_error(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
