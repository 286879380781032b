"""Writes fine-tune folders in the real formats with seeded random weights (tests and benchmarks; no download).

- ``write_lora_adapter``: PEFT's layout for a ChatGLM3 LoRA: ``adapter_config.json`` and ``adapter_model.safetensors``
  (or ``adapter_model.bin``) with ``base_model.model.transformer.encoder.layers.{i}.<module>.lora_A.weight`` [r, in] and
  ``...lora_B.weight`` [out, r]. Unlike a fresh PEFT adapter (B = 0), B is random, so the adapter changes the output.
- ``write_ptuning_checkpoint``: ChatGLM3's P-tuning v2 layout: ``config.json`` (the base model's keys plus
  ``pre_seq_len`` and ``prefix_projection``) and ``pytorch_model.bin`` with the ``transformer.prefix_encoder.*``
  tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from glmserve.engine.config.model_config import ModelConfig
from glmserve.engine.lora.peft_adapter import LORA_MODULES, module_shapes


def write_lora_adapter(out_dir: str | Path, config: ModelConfig, *, rank: int, alpha: float,
                       targets: tuple[str, ...] = ("query_key_value",), use_rslora: bool = False, seed: int = 0,
                       fmt: str = "safetensors", std: float = 0.1) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shapes = module_shapes(config)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(config.num_layers):
        for module in targets:
            in_features, out_features = shapes[module]
            base = f"base_model.model.transformer.encoder.layers.{layer}.{LORA_MODULES[module]}"
            tensors[f"{base}.lora_A.weight"] = torch.randn(rank, in_features, generator=gen) * std
            tensors[f"{base}.lora_B.weight"] = torch.randn(out_features, rank, generator=gen) * std
    settings = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "THUDM/chatglm3-6b",
        "r": rank, "lora_alpha": alpha, "lora_dropout": 0.1, "target_modules": list(targets), "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "inference_mode": True, "init_lora_weights": True,
        "use_rslora": use_rslora, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(tensors, out / "adapter_model.bin")
    else:
        raise ValueError(f"format must be safetensors or bin, got {fmt!r}")
    return out


def write_ptuning_checkpoint(out_dir: str | Path, config: ModelConfig, *, pre_seq_len: int,
                             prefix_projection: bool = False, seed: int = 0, std: float = 1.0) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    kv_size = config.num_layers * config.kv_channels * config.multi_query_group_num * 2
    prefix = "transformer.prefix_encoder."
    tensors = {prefix + "embedding.weight": torch.randn(pre_seq_len, kv_size, generator=gen) * std}
    if prefix_projection:
        h = config.hidden_size
        tensors.update({
            prefix + "trans.0.weight": torch.randn(h, kv_size, generator=gen) / kv_size ** 0.5,
            prefix + "trans.0.bias": torch.randn(h, generator=gen) * 0.1,
            prefix + "trans.2.weight": torch.randn(kv_size, h, generator=gen) * std / h ** 0.5,
            prefix + "trans.2.bias": torch.randn(kv_size, generator=gen) * 0.1,
        })
    settings = config.to_hf_config_json()
    settings.update(pre_seq_len=pre_seq_len, prefix_projection=prefix_projection)
    (out / "config.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    torch.save(tensors, out / "pytorch_model.bin")
    return out
