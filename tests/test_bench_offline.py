"""``glmserve-bench offline`` end to end on a tiny workload: the JSON result, and greedy agreement with HF."""
from __future__ import annotations

import json

import pytest
import torch

from glmserve.bench.cli import main

pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """The benchmark sets torch's thread count for the whole process; later tests get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_offline_benchmark_tiny(tmp_path, capsys):
    out = tmp_path / "results" / "offline.json"   # a folder that does not exist yet: the benchmark makes it
    rc = main(["offline", "--model", "glm-tiny", "--num-requests", "5", "--input-len", "3:40", "--output-len", "2:12",
               "--max-num-seqs", "2", "--hf-single-requests", "2", "--threads", "1", "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert {"settings", "machine", "glmserve", "overhead", "hf_static", "hf_single", "agreement",
            "ratios"} <= result.keys()
    assert result["machine"]["torch_threads"] == 1
    assert result["glmserve"]["num_requests"] == result["hf_static"]["num_requests"] == 5
    # Useful tokens only: the static batches' padding steps are not counted.
    assert result["glmserve"]["num_output_tokens"] == result["hf_static"]["num_output_tokens"]
    assert result["hf_single"]["num_requests"] == 2 and result["hf_single"]["subset"]
    assert set(result["ratios"]) == {"vs_hf_static", "vs_hf_single"}
    overhead = result["overhead"]
    assert overhead["forward_seconds"] + overhead["logits_seconds"] <= overhead["total_seconds"]
    assert overhead["num_steps"] > 0 and 0.0 <= overhead["overhead"] < 1.0
    agreement = {a["baseline"]: a for a in result["agreement"]}
    assert agreement["HF static batches"]["agree"] == agreement["HF static batches"]["compared"] == 5
    assert agreement["HF one at a time"]["agree"] == agreement["HF one at a time"]["compared"] == 2
    printed = capsys.readouterr().out
    assert "glmserve / HF static batching" in printed and "correctness comparison" not in printed


def test_skip_hf_runs_glmserve_only(tmp_path):
    out = tmp_path / "results" / "offline.json"   # a folder that does not exist yet: the benchmark makes it
    assert main(["offline", "--model", "glm-tiny", "--num-requests", "3", "--input-len", "4:8", "--output-len", "3",
                 "--skip-hf", "--out", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["hf_static"] is None and result["hf_single"] is None and result["agreement"] == []
    assert result["glmserve"]["num_output_tokens"] == 9


def test_bfloat16_runs_every_system_in_bfloat16(tmp_path, capsys, monkeypatch):
    from glmserve.bench.offline import hf_baseline
    from glmserve.bench.offline import command as offline
    dtypes = []
    real_llm, real_hf = offline.LLM, hf_baseline.build_hf_model

    def llm(*args, **kwargs):
        made = real_llm(*args, **kwargs)
        dtypes.append(made.engine.runner.kv_caches[0][0].dtype)
        return made

    def hf_model(*args):
        made = real_hf(*args)
        dtypes.append(next(made.parameters()).dtype)
        return made

    monkeypatch.setattr(offline, "LLM", llm)
    monkeypatch.setattr(hf_baseline, "build_hf_model", hf_model)
    out = tmp_path / "results" / "offline_bf16.json"   # a folder that does not exist yet: the benchmark makes it
    assert main(["offline", "--model", "glm-tiny", "--num-requests", "3", "--input-len", "4:12", "--output-len", "3",
                 "--skip-hf-single", "--dtype", "bfloat16", "--out", str(out)]) == 0
    result = json.loads(out.read_text(encoding="utf-8"))
    printed = capsys.readouterr().out
    assert result["settings"]["dtype"] == "bfloat16" and "greedy bfloat16" in printed
    assert "float32 is the correctness comparison" in printed
    (static,) = result["agreement"]
    assert static["compared"] == 3 and result["hf_static"]["num_output_tokens"] == 9
    assert dtypes == [torch.bfloat16, torch.bfloat16]         # glmserve's KV cache, HF's weights


def test_an_unknown_dtype_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["offline", "--model", "glm-tiny", "--dtype", "float16"])
    assert exit_info.value.code == 2 and "invalid choice: 'float16'" in capsys.readouterr().err


def test_median_ratios_over_rounds():
    from glmserve.bench.common.machine import machine_info
    from glmserve.bench.offline.report import EngineOverhead, OfflineResult, SystemResult, median_ratios

    def round_result(ours: float, static: float) -> OfflineResult:
        system = lambda name, seconds: SystemResult(name, 1, 100, seconds, 0.0, 0.0)   # noqa: E731
        return OfflineResult({}, machine_info(), system("glmserve", 100 / ours),
                             EngineOverhead(1, 0.5, 0.4, 100, 1, 1, 0), hf_static=system("hf", 100 / static))
    rounds = [round_result(400, 200), round_result(300, 100), round_result(350, 200)]
    assert median_ratios(rounds) == {"vs_hf_static": 2.0}    # per-round ratios 2.0, 3.0 and 1.75


def test_rounds_recompute_their_prompts(tmp_path):
    import json

    import torch

    from glmserve.bench.cli import main
    out = tmp_path / "results" / "rounds.json"   # a folder that does not exist yet: the benchmark makes it
    threads = torch.get_num_threads()
    try:
        assert main(["offline", "--model", "glm-tiny", "--num-requests", "4", "--input-len", "20:40",
                     "--output-len", "2:4", "--skip-hf", "--rounds", "2", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    rounds = json.loads(out.read_text())["rounds"]
    # the second round finds nothing of the first in the prefix cache: it forwards every prompt token again
    assert rounds[0]["overhead"]["num_forward_tokens"] == rounds[1]["overhead"]["num_forward_tokens"]
