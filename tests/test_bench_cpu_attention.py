"""``glmserve-bench cpu-attention`` end to end on small shapes (no timing is asserted)."""
from __future__ import annotations

import json

import pytest

from glmserve.bench.cli import main
from glmserve.kernels.cpu import native as cpu_native
from glmserve.kernels.cpu.availability import native_cpu_available


@pytest.mark.skipif(not native_cpu_available(), reason="the native CPU kernels did not build here")
def test_cpu_attention_benchmark_writes_every_point(tmp_path, capsys):
    out = tmp_path / "results" / "cpu_attention.json"   # a folder that does not exist yet: the benchmark makes it
    assert main(["cpu-attention", "--batch", "5", "--context", "1:70", "--heads", "4/2x32,6/6x20",
                 "--prefill-lens", "3,40", "--iterations", "2", "--out", str(out)]) == 0
    points = json.loads(out.read_text())["points"]
    decode, prefill = points[:2], points[2:]
    assert [(p["heads"], p["kv_heads"], p["head_dim"], p["batch"]) for p in decode] == [(4, 2, 32, 5), (6, 6, 20, 5)]
    assert [(p["heads"], p["prompt_tokens"]) for p in prefill] == [(4, 3), (4, 40), (6, 3), (6, 40)]
    for point in points:
        assert point["max_abs_diff"] < 1e-5             # the native kernel agrees with the torch reference
        assert point["native_ms"] > 0 and point["torch_ms"] > 0
    assert all(5 <= p["context_tokens"] <= 5 * 70 for p in decode)
    assert "native ms" in capsys.readouterr().out


@pytest.mark.skipif(not native_cpu_available(), reason="the native CPU kernels did not build here")
def test_cpu_attention_benchmark_in_bfloat16(tmp_path):
    out = tmp_path / "results" / "cpu_attention_bf16.json"   # a folder that does not exist yet: the benchmark makes it
    assert main(["cpu-attention", "--batch", "3", "--context", "1:40", "--heads", "4/2x32", "--prefill-lens", "9",
                 "--iterations", "1", "--dtype", "bfloat16", "--out", str(out)]) == 0
    points = json.loads(out.read_text())["points"]
    assert [p["dtype"] for p in points] == ["bfloat16", "bfloat16"]
    assert all(p["max_abs_diff"] < 2e-2 for p in points)     # one bf16 rounding step of outputs below 4


def test_cpu_attention_benchmark_without_the_native_kernels_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv(cpu_native.ENV_SWITCH, "0")
    assert main(["cpu-attention", "--batch", "2"]) == 2
    assert "native CPU kernels did not build" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--heads", "8x64"], "an attention shape is H/KVHxD"),
    (["--heads", "8/3x64"], "H a multiple of KVH"),
    (["--batch", "0"], "must be positive"),
    (["--prefill-lens", "128,x"], "--prefill-lens takes comma-separated positive integers"),
])
def test_cpu_attention_benchmark_rejects_malformed_arguments(capsys, args, message):
    assert main(["cpu-attention", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--context", "9:3"], "expected 1 <= LOW <= HIGH"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
])
def test_cpu_attention_benchmark_rejects_a_bad_range_or_type(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["cpu-attention", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
