"""``glmserve-bench lora`` runs end to end on a tiny workload and reports what it says it reports (the figures
themselves are timings: not asserted)."""
from __future__ import annotations

from glmserve.bench.cli import main
from glmserve.bench.lora import chatglm3_6b_memory


def test_lora_bench_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "lora.json"
    assert main(["lora", "--model", "glm-tiny", "--num-requests", "6", "--num-adapters", "3", "--rank", "4",
                 "--input-len", "12", "--output-len", "4", "--rounds", "1", "--pre-seq-len", "20",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "base model" in text and "3 LoRA adapters (r=4, 4 modules)" in text and "P-tuning prefix (P=20)" in text
    import json
    result = json.loads(out.read_text())
    assert result["base_tokens_per_s"] > 0 and result["lora_tokens_per_s"] > 0
    # glm-tiny: rank 4 x (128+256 + 128+128 + 128+512 + 256+128) x 2 layers x 4 bytes, for all four modules
    assert result["adapter_host_bytes"] == 4 * (384 + 256 + 640 + 384) * 2 * 4 == result["adapter_slot_bytes"]
    # 20 prefix slots pin 2 blocks of 16 tokens: 2 layers x 2 (K, V) x 2 groups x 32 dims x 4 bytes per token
    assert result["ptuning_kv_bytes"] == 2 * 16 * 2 * 2 * 2 * 32 * 4


def test_chatglm3_6b_figures_follow_from_the_shapes():
    figures = chatglm3_6b_memory(16, ("query_key_value",), 128)
    assert figures["adapter_bytes"] == 16 * (4096 + 4608) * 28 * 2
    assert figures["ptuning_kv_bytes"] == 128 * 28 * 2 * 2 * 128 * 2


def test_bad_arguments_exit_2(capsys):
    assert main(["lora", "--num-adapters", "0"]) == 2
    assert "--num-adapters must be >= 1" in capsys.readouterr().err
