"""Checkpoint loading: safetensors and .bin, sharded and single file, quantized, and every bad-checkpoint case
ending with one clear message that names the file or tensor."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from glmserve.engine.model.checkpoint_writer import quantize_state_dict, random_state_dict, write_checkpoint
from glmserve.engine.config.errors import ConfigError
from glmserve.engine.config.model_config import ModelConfig
from glmserve.engine.model.loader import load_model, resolve_model_source
from glmserve.engine.text.tokenizer import embedded_tokenizer_path
from glmserve.engine.model.weights import CheckpointError, dequantize

CONFIG = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, kv_channels=8, multi_query_group_num=2,
                     ffn_hidden_size=48, padded_vocab_size=2048, seq_length=256, torch_dtype="float32")
CPU = torch.device("cpu")


def _load(path: Path, load_format: str = "auto"):
    return load_model(resolve_model_source(str(path), load_format), CPU, torch.float32)


def _write(tmp_path: Path, **kwargs) -> Path:
    return write_checkpoint(tmp_path / "ckpt", kwargs.pop("config", CONFIG), embedded_tokenizer_path(), **kwargs)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("shards", [1, 3])
def test_formats_and_shards_load_the_exact_tensors(tmp_path, fmt, shards):
    state = random_state_dict(CONFIG, seed=3, dtype=torch.float32)
    ckpt = _write(tmp_path, fmt=fmt, shards=shards, state=state)
    index = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}[fmt]
    assert (ckpt / index).exists() == (shards > 1)
    model = _load(ckpt)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert "transformer.rotary_pos_emb.inv_freq" in state          # present on disk, skipped by the loader


def test_auto_prefers_safetensors_and_explicit_format_is_honoured(tmp_path):
    state = random_state_dict(CONFIG, seed=3, dtype=torch.float32)
    ckpt = _write(tmp_path, fmt="safetensors", state=state)
    other = {k: v + 1 for k, v in state.items()}
    write_checkpoint(ckpt, CONFIG, embedded_tokenizer_path(), fmt="bin", state=other)
    name = "transformer.output_layer.weight"
    assert torch.equal(_load(ckpt).state_dict()[name], state[name])
    assert torch.equal(_load(ckpt, "bin").state_dict()[name], other[name])


@pytest.mark.parametrize("bits", [8, 4])
def test_weight_only_quantized_checkpoints_load_dequantized(tmp_path, bits):
    config = dataclasses.replace(CONFIG, quantization_bit=bits)
    state = random_state_dict(config, seed=4, dtype=torch.float32)
    ckpt = _write(tmp_path, config=config, state=quantize_state_dict(state, bits), shards=2)
    model = _load(ckpt)
    name = "transformer.encoder.layers.1.mlp.dense_h_to_4h.weight"
    on_disk = quantize_state_dict({name: state[name]}, bits)
    expected = dequantize(on_disk[name], on_disk[name + "_scale"], bits, torch.float32)
    assert torch.equal(model.state_dict()[name], expected)
    # the dequantized weight is close to the original (within half a quantization step per row)
    step = state[name].abs().amax(dim=1, keepdim=True) / (127 if bits == 8 else 7)
    assert ((model.state_dict()[name] - state[name]).abs() <= step * 0.5 + 1e-3).all()
    emb = "transformer.embedding.word_embeddings.weight"
    assert torch.equal(model.state_dict()[emb], state[emb])         # embeddings stay unquantized


def test_int4_packing_is_high_nibble_first():
    packed = torch.tensor([[0x1F, -0x80 + 0x07]], dtype=torch.int8)  # bytes 0x1F and 0x87
    values = dequantize(packed, torch.ones(1, dtype=torch.float16), 4, torch.float32)
    assert values.tolist() == [[1.0, -1.0, -8.0, 7.0]]


# ---- bad checkpoints: one clear message each --------------------------------------------------------------------
def test_missing_config(tmp_path):
    ckpt = _write(tmp_path)
    (ckpt / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"missing config.json: .*config.json does not exist"):
        _load(ckpt)


def test_invalid_config_json(tmp_path):
    ckpt = _write(tmp_path)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read .*config.json"):
        _load(ckpt)


def test_inconsistent_config(tmp_path):
    ckpt = _write(tmp_path)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["multi_query_group_num"] = 3
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="multiple of multi_query_group_num"):
        _load(ckpt)


def test_missing_tokenizer(tmp_path):
    ckpt = _write(tmp_path)
    (ckpt / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match=r"missing tokenizer: .*tokenizer.model does not exist"):
        _load(ckpt)


def test_no_weights(tmp_path):
    ckpt = _write(tmp_path)
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found in .*model.safetensors.index.json"):
        _load(ckpt)


def test_missing_shard_listed_in_index(tmp_path):
    ckpt = _write(tmp_path, shards=2)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors listed in .* does not exist"):
        _load(ckpt)


@pytest.mark.parametrize("fmt, name", [("safetensors", "model.safetensors"), ("bin", "pytorch_model.bin")])
def test_unreadable_weights_file(tmp_path, fmt, name):
    ckpt = _write(tmp_path, fmt=fmt)
    (ckpt / name).write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match=f"cannot read weights file .*{name}"):
        _load(ckpt)


def test_missing_tensor(tmp_path):
    state = random_state_dict(CONFIG, seed=3, dtype=torch.float32)
    del state["transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"]
    ckpt = _write(tmp_path, state=state)
    with pytest.raises(CheckpointError, match=r"tensor 'transformer.encoder.layers.1.mlp.dense_4h_to_h.weight' is missing"):
        _load(ckpt)


def test_unexpected_tensor(tmp_path):
    state = random_state_dict(CONFIG, seed=3, dtype=torch.float32)
    state["transformer.encoder.layers.9.mlp.extra.weight"] = torch.zeros(2)
    ckpt = _write(tmp_path, state=state)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'transformer.encoder.layers.9.mlp.extra.weight' in .*model.safetensors"):
        _load(ckpt)


def test_wrong_shape_names_expected_and_found(tmp_path):
    state = random_state_dict(CONFIG, seed=3, dtype=torch.float32)
    name = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
    state[name] = torch.zeros(10, 32)
    ckpt = _write(tmp_path, state=state)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' in .* has shape \(10, 32\), expected \(64, 32\)"):
        _load(ckpt)


def test_quantized_tensor_without_scale(tmp_path):
    config = dataclasses.replace(CONFIG, quantization_bit=8)
    state = quantize_state_dict(random_state_dict(config, seed=4, dtype=torch.float32), 8)
    del state["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight_scale"]
    ckpt = _write(tmp_path, config=config, state=state)
    with pytest.raises(CheckpointError, match="dense_4h_to_h.weight_scale is missing"):
        _load(ckpt)


def test_unknown_model_name():
    with pytest.raises(CheckpointError, match="neither a checkpoint directory nor a preset"):
        resolve_model_source("no-such-model-anywhere")


def test_preset_with_a_weights_format_is_refused():
    with pytest.raises(CheckpointError, match="has no weights on disk"):
        resolve_model_source("glm-tiny", "safetensors")


def test_presets_have_the_published_shapes():
    from glmserve.engine.config.model_config import MODEL_PRESETS
    six_b, long = MODEL_PRESETS["chatglm3-6b"], MODEL_PRESETS["chatglm3-6b-32k"]
    assert six_b.num_parameters() == 6_243_584_000
    assert six_b.kv_bytes_per_token(2) == 28_672
    assert (six_b.rope_base, long.rope_base, long.seq_length) == (10000.0, 500000.0, 32768)


def test_config_round_trips_through_chatglm_json(tmp_path):
    config = dataclasses.replace(CONFIG, rope_ratio=50.0)
    ckpt = _write(tmp_path, config=config)
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["model_type"] == "chatglm" and raw["rope_ratio"] == 50.0
    assert ModelConfig.from_json(str(ckpt / "config.json")) == config
    shutil.rmtree(ckpt)
