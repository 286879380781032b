"""From ``--model DIR_OR_PRESET`` to a GLMForCausalLM with its weights on the device.

Shards are read one at a time and copied into parameters that were allocated once, so peak host memory stays
near the model size plus one shard. A tensor-parallel rank allocates and reads only its share of each tensor.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from glmserve.engine.config.model_config import MODEL_PRESETS, ModelConfig, preset_names
from glmserve.engine.model.collectives import Collectives
from glmserve.engine.model.glm import GLMForCausalLM
from glmserve.engine.model.shard_layout import ShardLayout, TensorSlice
from glmserve.engine.model.weights import (IGNORED_TENSOR_SUFFIXES, QUANTIZED_LINEARS, CheckpointError, ShardFile, find_weight_files,
                      quantized_storage_shape, scale_rows, take_slice, unpack_int4)


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
        from glmserve.engine.text.tokenizer import embedded_tokenizer_path
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


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The full (unsharded) shape of every parameter, from a model on the meta device (no memory)."""
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in GLMForCausalLM(config).named_parameters()}


def init_dummy_weights(model: GLMForCausalLM, seed: int) -> None:
    """Seeded random weights (like vLLM's dummy format): the same values for the same seed and device type.

    Each full tensor is drawn in name order and the model keeps its shard of it, so a tensor-parallel rank holds
    exactly the slice of what one process would hold (one full tensor at a time is in memory). On CUDA the draws
    happen on the GPU: drawing ChatGLM3-6B's 6.2 billion values on the host would take minutes.
    """
    device = next(model.parameters()).device
    draw_on = device if device.type == "cuda" else torch.device("cpu")
    gen = torch.Generator(draw_on).manual_seed(seed)
    params = dict(model.named_parameters())
    for name, shape in sorted(parameter_shapes(model.shard.config).items()):
        values = torch.randn(shape, generator=gen, device=draw_on)   # scaled in place: one full tensor, not two
        if name.endswith("layernorm.weight"):
            values.mul_(0.1).add_(1.0)
        else:
            values.mul_(0.02)
        with torch.no_grad():
            params[name].copy_(take_slice(values, model.shard.tensor_slice(name)).to(params[name].dtype))


def load_model(source: ModelSource, device: torch.device, dtype: torch.dtype, seed: int = 0,
               shard: ShardLayout | None = None, group: Collectives | None = None) -> GLMForCausalLM:
    """The model (or, with ``shard`` and ``group``, one tensor-parallel rank's share of it) with its weights.
    Only the rank's share is ever allocated."""
    with torch.device("meta"):
        model = GLMForCausalLM(source.config, shard, group)
    model.to_empty(device=device)
    model.to(dtype)
    if source.load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        load_checkpoint_weights(model, source.checkpoint_dir, source.load_format)
    return model.eval()


def load_checkpoint_weights(model: GLMForCausalLM, checkpoint_dir: Path, load_format: str) -> None:
    """Copy each checkpoint tensor (or the model's shard of it) into the model, one shard file at a time."""
    layout = model.shard
    bits = layout.config.quantization_bit
    params = dict(model.named_parameters())
    shapes = parameter_shapes(layout.config)
    loaded: set[str] = set()
    pending: dict[str, dict[str, torch.Tensor]] = {}   # quantized linears waiting for their data or scale
    files = find_weight_files(checkpoint_dir, load_format)
    show = sys.stderr.isatty() and not os.environ.get("GLMSERVE_NO_PROGRESS")
    for path in tqdm(files.paths, desc="loading shards", unit="shard", disable=not show):
        with ShardFile(path, files.format) as shard:
            for name in shard.names():
                if name.endswith(IGNORED_TENSOR_SUFFIXES):
                    continue
                base = name.removesuffix(".weight").removesuffix(".weight_scale")
                if bits and base.endswith(QUANTIZED_LINEARS) and base + ".weight" in params:
                    parts = pending.setdefault(base, {})
                    full_shape = shapes[base + ".weight"]
                    piece = layout.tensor_slice(base + ".weight")
                    if name.endswith("weight_scale"):
                        parts["scale"] = _read_scale(shard, name, full_shape, piece)
                    else:
                        parts["values"] = _read_quantized_values(shard, name, full_shape, piece, bits)
                    if len(parts) == 2:
                        with torch.no_grad():
                            param = params[base + ".weight"]
                            param.copy_(scale_rows(parts["values"], parts["scale"], param.dtype))
                        loaded.add(base + ".weight")
                        del pending[base]
                    continue
                if name not in params:
                    raise CheckpointError(f"unexpected tensor {name!r} in {path}")
                if shard.shape(name) != shapes[name]:
                    raise CheckpointError(f"tensor {name!r} in {path} has shape {shard.shape(name)}, "
                                          f"expected {shapes[name]}")
                param = params[name]
                with torch.no_grad():
                    param.copy_(shard.read(name, layout.tensor_slice(name)).to(param.dtype))
                loaded.add(name)
    for base, parts in pending.items():
        missing = "weight_scale" if "values" in parts else "weight"
        raise CheckpointError(f"quantized tensor {base}.{missing} is missing from {checkpoint_dir}")
    missing = sorted(set(params) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]!r} is missing from the checkpoint in {checkpoint_dir}{more}")


def _read_quantized_values(shard: ShardFile, name: str, full_shape: tuple[int, ...], piece: TensorSlice | None,
                           bits: int) -> torch.Tensor:
    """The int8 values [rows, cols] of the model's share of a quantized weight (int4 unpacked)."""
    expected = quantized_storage_shape(full_shape, bits)
    if shard.shape(name) != expected:
        raise CheckpointError(f"quantized tensor {name} in {shard.path} has shape {shard.shape(name)}, "
                              f"expected {expected} for {bits}-bit weights")
    if bits == 8:
        return shard.read(name, piece).to(torch.int8)
    if piece is None or piece.dim == 0:
        return unpack_int4(shard.read(name, piece))
    # A column range of int4 data: read the bytes that hold it, unpack, and drop the half byte at either end.
    parts = []
    for start, stop in piece.ranges:
        packed = shard.read(name, TensorSlice(1, ((start // 2, (stop + 1) // 2),)))
        parts.append(unpack_int4(packed)[:, start % 2:start % 2 + stop - start])
    return torch.cat(parts, dim=1)


def _read_scale(shard: ShardFile, name: str, full_shape: tuple[int, ...], piece: TensorSlice | None) -> torch.Tensor:
    """The per-output-row scale of the rows the model holds (all rows for a column-split weight)."""
    if shard.shape(name) != (full_shape[0],):
        raise CheckpointError(f"tensor {name} in {shard.path} has shape {shard.shape(name)}, "
                              f"expected {(full_shape[0],)}")
    return shard.read(name, piece if piece is not None and piece.dim == 0 else None)
