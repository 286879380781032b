"""Writes a complete ChatGLM3-format checkpoint directory (config.json, tokenizer files, sharded weights).

Used by ``glmserve make-test-model`` and by tests: a real directory on disk in the real format, with random
weights, so the loader is exercised exactly as with a downloaded model.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from glmserve.engine.config.model_config import ModelConfig
from glmserve.engine.model.loader import init_dummy_weights
from glmserve.engine.model.glm import GLMForCausalLM
from glmserve.engine.model.weights import (BIN_INDEX, BIN_SINGLE, QUANTIZED_LINEARS, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, quantize)

TOKENIZER_CONFIG = {
    "name_or_path": "THUDM/chatglm3-6b",
    "remove_space": False,
    "do_lower_case": False,
    "tokenizer_class": "ChatGLMTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
}


def random_state_dict(config: ModelConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (ChatGLM3 names) with seeded random values, plus the unused rotary inv_freq."""
    model = GLMForCausalLM(config)
    init_dummy_weights(model, seed)
    state = {name: t.detach().to(dtype).contiguous() for name, t in model.state_dict().items()}
    rotary_dim = config.rotary_dim
    state["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (
        10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)).to(dtype)
    return state


def quantize_state_dict(state: dict[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        base = name.removesuffix(".weight")
        if name.endswith(".weight") and base.endswith(QUANTIZED_LINEARS):
            out[name], out[base + ".weight_scale"] = quantize(tensor, bits)
        else:
            out[name] = tensor
    return out


def write_checkpoint(out_dir: str | Path, config: ModelConfig, tokenizer_path: str | Path, *,
                     fmt: str = "safetensors", shards: int = 1, seed: int = 0, dtype: torch.dtype | None = None,
                     state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write config.json, tokenizer.model, tokenizer_config.json and the weights. Returns the directory."""
    if fmt not in ("safetensors", "bin"):
        raise ValueError(f"format must be safetensors or bin, got {fmt!r}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype or getattr(torch, config.torch_dtype)
    if state is None:
        state = random_state_dict(config, seed, dtype)
        if config.quantization_bit:
            state = quantize_state_dict(state, config.quantization_bit)
    (out / "config.json").write_text(json.dumps(config.to_hf_config_json(), indent=2) + "\n", encoding="utf-8")
    shutil.copyfile(tokenizer_path, out / "tokenizer.model")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n", encoding="utf-8")
    _write_weights(out, state, fmt, shards)
    return out


def _write_weights(out: Path, state: dict[str, torch.Tensor], fmt: str, shards: int) -> None:
    names = list(state)
    per_shard = -(-len(names) // shards)
    groups = [names[i:i + per_shard] for i in range(0, len(names), per_shard)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    prefix = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups, start=1):
        filename = (SAFETENSORS_SINGLE if fmt == "safetensors" else BIN_SINGLE) if len(groups) == 1 \
            else f"{prefix}-{k:05d}-of-{len(groups):05d}.{ext}"
        tensors = {n: state[n].contiguous() for n in group}
        if fmt == "safetensors":
            from safetensors.torch import save_file
            save_file(tensors, str(out / filename), metadata={"format": "pt"})
        else:
            torch.save(tensors, out / filename)
        weight_map.update({n: filename for n in group})
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        index_name = SAFETENSORS_INDEX if fmt == "safetensors" else BIN_INDEX
        (out / index_name).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
