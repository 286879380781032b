"""The tensor-parallel memory benchmark end to end on glm-tiny: every rank of N = 2 holds half of N = 1's parameter
bytes (plus the replicated norms), measured in the ranks' own processes. Bytes, not time."""
from __future__ import annotations

import pytest

import json

from glmserve.bench import tp_memory
from glmserve.engine.config.model_config import MODEL_PRESETS

pytestmark = pytest.mark.tensor_parallel


def test_tp_memory_reports_half_the_parameter_bytes_per_rank_at_n2(tmp_path, capsys):
    out = tmp_path / "results" / "tp_memory.json"   # a folder that does not exist yet: the benchmark makes it
    assert tp_memory.main(["--model", "glm-tiny", "--sizes", "1", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    one, two = result["sizes"]
    (full,) = one["ranks"]
    config = MODEL_PRESETS["glm-tiny"]
    assert full["parameter_bytes"] == config.num_parameters() * 4
    norms = (2 * config.num_layers + 1) * config.hidden_size * 4
    assert [r["rank"] for r in two["ranks"]] == [0, 1]
    for rank in two["ranks"]:
        assert rank["parameter_bytes"] == (full["parameter_bytes"] - norms) / 2 + norms
        assert rank["parameter_bytes"] / full["parameter_bytes"] <= 0.51
        assert 0 < rank["rss_bytes"] <= rank["peak_rss_bytes"]
    assert "tensor-parallel memory, glm-tiny" in capsys.readouterr().out
