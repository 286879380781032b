"""``glmserve-bench cpu-linear`` end to end on tiny shapes (no timing is asserted)."""
from __future__ import annotations

import json

import pytest

from glmserve.bench.cli import main
from glmserve.engine.model import cpu_linear


@pytest.mark.skipif(not cpu_linear.onednn_linear_supported(), reason="no working oneDNN linear in this torch")
def test_cpu_linear_benchmark_writes_every_point(tmp_path, capsys):
    out = tmp_path / "results" / "cpu_linear.json"   # a folder that does not exist yet: the benchmark makes it
    assert main(["cpu-linear", "--shapes", "96x32,40x64", "--rows", "1,9", "--iterations", "2",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    shapes = [(p["out_features"], p["in_features"], p["rows"]) for p in result["points"]]
    assert shapes == [(96, 32, 1), (96, 32, 9), (40, 64, 1), (40, 64, 9)]
    for point in result["points"]:
        assert point["max_abs_diff"] < 1e-4            # oneDNN and F.linear agree to fp32 rounding
        assert point["f_linear_ms"] > 0 and point["onednn_packed_ms"] > 0
    assert "F.linear ms" in capsys.readouterr().out


@pytest.mark.skipif(not cpu_linear.onednn_bf16_packing_supported(), reason="oneDNN has no bf16 kernels here")
def test_cpu_linear_benchmark_in_bfloat16(tmp_path):
    out = tmp_path / "results" / "cpu_linear_bf16.json"   # a folder that does not exist yet: the benchmark makes it
    assert main(["cpu-linear", "--shapes", "96x32", "--rows", "3", "--iterations", "1", "--dtype", "bfloat16",
                 "--out", str(out)]) == 0
    (point,) = json.loads(out.read_text())["points"]
    assert point["dtype"] == "bfloat16" and point["max_abs_diff"] < 0.1     # within bf16 rounding of outputs ~10


def test_cpu_linear_benchmark_without_onednn_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv(cpu_linear.ENV_SWITCH, "0")
    assert main(["cpu-linear", "--shapes", "8x8", "--rows", "1"]) == 2
    assert "no working oneDNN linear" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [
    ("--shapes", "65024*512", "a weight shape is OUTxIN"),
    ("--shapes", "0x512", "expected a positive integer, got '0'"),
    ("--rows", "8,many", "expected a positive integer, got 'many'"),
])
def test_cpu_linear_benchmark_rejects_malformed_arguments(capsys, flag, value, message):
    assert main(["cpu-linear", flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cpu_linear_benchmark_rejects_an_unknown_dtype(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["cpu-linear", "--dtype", "float16"])
    assert exit_info.value.code == 2 and "invalid choice: 'float16'" in capsys.readouterr().err


@pytest.mark.skipif(not cpu_linear.onednn_linear_supported(), reason="no working oneDNN linear in this torch")
def test_cpu_linear_benchmark_in_bfloat16_without_bf16_kernels_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setattr(cpu_linear, "onednn_bf16_packing_supported", lambda: False)
    assert main(["cpu-linear", "--shapes", "8x8", "--rows", "1", "--dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "no bfloat16 kernels for this CPU" in err and "Traceback" not in err
