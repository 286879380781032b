"""From ``--model DIR_OR_PRESET`` to a GLMForCausalLM with its weights on the device.

Shards are read one at a time and copied into parameters that were allocated once, so peak host memory stays
near the model size plus one shard.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .config import MODEL_PRESETS, ModelConfig, preset_names
from .model import GLMForCausalLM
from .weights import (IGNORED_TENSOR_SUFFIXES, QUANTIZED_LINEARS, CheckpointError, dequantize, find_weight_files,
                      iter_shard_tensors, quantized_storage_shape)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: a ChatGLM3 checkpoint directory, or a preset with dummy weights."""

    name: str
    config: ModelConfig
    tokenizer_path: str
    load_format: str                  # "safetensors" | "bin" | "dummy"
    checkpoint_dir: Path | None = None


def resolve_model_source(model: str, load_format: str = "auto", tokenizer: str | None = None) -> ModelSource:
    if model in MODEL_PRESETS and not Path(model).is_dir():
        if load_format not in ("auto", "dummy"):
            raise CheckpointError(f"preset {model!r} has no weights on disk: use --load-format dummy "
                                  "or pass a checkpoint directory")
        from .tokenizer import embedded_tokenizer_path
        return ModelSource(model, MODEL_PRESETS[model], tokenizer or embedded_tokenizer_path(), "dummy")
    path = Path(model)
    if not path.is_dir():
        raise CheckpointError(f"model {model!r} is neither a checkpoint directory nor a preset "
                              f"({', '.join(preset_names())})")
    config = ModelConfig.from_json(str(path / "config.json"))
    tokenizer_path = tokenizer or str(path / "tokenizer.model")
    if not Path(tokenizer_path).is_file():
        raise CheckpointError(f"missing tokenizer: {tokenizer_path} does not exist")
    if load_format == "dummy":
        return ModelSource(path.name, config, tokenizer_path, "dummy", path)
    files = find_weight_files(path, load_format)
    return ModelSource(path.name, config, tokenizer_path, files.format, path)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    # Half precision is very slow on CPUs without native support; bf16 is the GPU default.
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def init_dummy_weights(model: GLMForCausalLM, seed: int) -> None:
    """Seeded random weights (like vLLM's dummy format): the same values on every device."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in sorted(model.named_parameters()):
        if name.endswith("layernorm.weight"):
            values = 1.0 + 0.1 * torch.randn(param.shape, generator=gen)
        else:
            values = 0.02 * torch.randn(param.shape, generator=gen)
        with torch.no_grad():
            param.copy_(values.to(param.dtype))


def load_model(source: ModelSource, device: torch.device, dtype: torch.dtype, seed: int = 0) -> GLMForCausalLM:
    with torch.device("meta"):
        model = GLMForCausalLM(source.config)
    model.to_empty(device=device)
    model.to(dtype)
    if source.load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        load_checkpoint_weights(model, source.checkpoint_dir, source.load_format)
    return model.eval()


def load_checkpoint_weights(model: GLMForCausalLM, checkpoint_dir: Path, load_format: str) -> None:
    bits = model.config.quantization_bit
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    pending: dict[str, dict[str, torch.Tensor]] = {}   # quantized linears waiting for their data or scale
    files = find_weight_files(checkpoint_dir, load_format)
    show = sys.stderr.isatty() and not os.environ.get("GLMSERVE_NO_PROGRESS")
    for path in tqdm(files.paths, desc="loading shards", unit="shard", disable=not show):
        for name, tensor in iter_shard_tensors(path, files.format):
            if name.endswith(IGNORED_TENSOR_SUFFIXES):
                continue
            base = name.removesuffix(".weight").removesuffix(".weight_scale")
            if bits and base.endswith(QUANTIZED_LINEARS) and base + ".weight" in params:
                parts = pending.setdefault(base, {})
                parts["scale" if name.endswith("weight_scale") else "data"] = tensor
                if len(parts) == 2:
                    _copy_quantized(params, base, parts, bits, path)
                    loaded.add(base + ".weight")
                    del pending[base]
                continue
            if name not in params:
                raise CheckpointError(f"unexpected tensor {name!r} in {path}")
            param = params[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise CheckpointError(f"tensor {name!r} in {path} has shape {tuple(tensor.shape)}, "
                                      f"expected {tuple(param.shape)}")
            with torch.no_grad():
                param.copy_(tensor.to(param.dtype))
            loaded.add(name)
    for base, parts in pending.items():
        missing = "weight_scale" if "data" in parts else "weight"
        raise CheckpointError(f"quantized tensor {base}.{missing} is missing from {checkpoint_dir}")
    missing = sorted(set(params) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]!r} is missing from the checkpoint in {checkpoint_dir}{more}")


def _copy_quantized(params: dict[str, torch.nn.Parameter], base: str, parts: dict[str, torch.Tensor], bits: int,
                    path: Path) -> None:
    param = params[base + ".weight"]
    data, scale = parts["data"], parts["scale"]
    expected = quantized_storage_shape(param.shape, bits)
    if tuple(data.shape) != expected:
        raise CheckpointError(f"quantized tensor {base}.weight in {path} has shape {tuple(data.shape)}, "
                              f"expected {expected} for {bits}-bit weights")
    if tuple(scale.shape) != (param.shape[0],):
        raise CheckpointError(f"tensor {base}.weight_scale in {path} has shape {tuple(scale.shape)}, "
                              f"expected {(param.shape[0],)}")
    with torch.no_grad():
        param.copy_(dequantize(data, scale, bits, param.dtype))
