"""Reading a LoRA adapter in PEFT's format: ``adapter_config.json`` plus ``adapter_model.safetensors`` (or ``.bin``).

Tensor names (ChatGLM3's fine-tuning scripts, PEFT's ``save_pretrained``):
``base_model.model.transformer.encoder.layers.{i}.self_attention.query_key_value.lora_A.weight`` [r, in] and
``...lora_B.weight`` [out, r], for the modules query_key_value, dense, dense_h_to_4h and dense_4h_to_h. The update is
``W x + scaling * B A x`` with ``scaling = lora_alpha / r`` (``use_rslora``: ``lora_alpha / sqrt(r)``); the loader
folds ``scaling`` into B (in float32, then one cast to the model's dtype).

Anything the engine would compute differently from PEFT is refused with a message naming the file and the key or
tensor: DoRA, per-module rank or alpha patterns, trained biases, ``modules_to_save``, other target modules, shapes
that do not fit the base model.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from glmserve.engine.config.model_config import ModelConfig
from glmserve.engine.core.adapters import AdapterLoadError
from glmserve.engine.model.weights import CheckpointError, ShardFile

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# The four linears of a block that a ChatGLM3 LoRA may target: config name -> module path inside the block.
LORA_MODULES = {
    "query_key_value": "self_attention.query_key_value",
    "dense": "self_attention.dense",
    "dense_h_to_4h": "mlp.dense_h_to_4h",
    "dense_4h_to_h": "mlp.dense_4h_to_h",
}
_TENSOR_NAME = re.compile(
    r"^(?:base_model\.model\.)?transformer\.encoder\.layers\.(\d+)\.(self_attention\.query_key_value|"
    r"self_attention\.dense|mlp\.dense_h_to_4h|mlp\.dense_4h_to_h)\.lora_([AB])(?:\.default)?\.weight$")
_MODULE_BY_PATH = {path: name for name, path in LORA_MODULES.items()}


def module_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-able linear of the base model."""
    h, ffn = config.hidden_size, config.ffn_hidden_size
    return {"query_key_value": (h, config.q_size + 2 * config.kv_size), "dense": (config.q_size, h),
            "dense_h_to_4h": (h, 2 * ffn), "dense_4h_to_h": (ffn, h)}


@dataclass
class LoraAdapter:
    """One adapter's weights on the host, scaling folded into B:
    ``weights[(layer, module)] = (A [r, in], B [out, r])``."""

    name: str
    path: Path
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def target_modules(self) -> list[str]:
        return sorted({module for _, module in self.weights})

    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def is_lora_adapter(path: Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def load_peft_adapter(name: str, path: str | Path, config: ModelConfig, max_rank: int,
                      dtype: torch.dtype) -> LoraAdapter:
    """Read and check an adapter folder; raises AdapterLoadError naming the file (and tensor) at fault."""
    folder = Path(path)
    settings = _read_config(folder / ADAPTER_CONFIG, max_rank)
    rank, alpha = settings["r"], settings["lora_alpha"]
    scaling = alpha / math.sqrt(rank) if settings.get("use_rslora") else alpha / rank
    weights_path = next((folder / f for f in ADAPTER_WEIGHTS if (folder / f).is_file()), None)
    if weights_path is None:
        raise AdapterLoadError(f"{folder}: no adapter weights (expected {' or '.join(ADAPTER_WEIGHTS)})")
    halves = _read_tensors(weights_path, config, rank)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, module), pair in sorted(halves.items()):
        missing = "A" if "A" not in pair else "B" if "B" not in pair else None
        if missing is not None:
            raise AdapterLoadError(f"{weights_path}: layer {layer} {module} has lora_{'B' if missing == 'A' else 'A'} "
                                   f"but no lora_{missing} tensor")
        lora_b = (pair["B"].float() * scaling).to(dtype)
        weights[(layer, module)] = (pair["A"].to(dtype).contiguous(), lora_b.contiguous())
    if not weights:
        raise AdapterLoadError(f"{weights_path}: no LoRA tensors of query_key_value, dense, dense_h_to_4h or "
                               "dense_4h_to_h")
    return LoraAdapter(name, folder, rank, scaling, weights)


def _read_config(path: Path, max_rank: int) -> dict:
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"cannot read {path}: {exc}") from None
    if not isinstance(settings, dict):
        raise AdapterLoadError(f"{path}: expected a JSON object")
    peft_type = settings.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise AdapterLoadError(f"{path}: peft_type {peft_type!r} is not supported (LORA only)")
    rank, alpha = settings.get("r"), settings.get("lora_alpha", settings.get("r"))
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterLoadError(f"{path}: r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise AdapterLoadError(f"{path}: r = {rank} exceeds --max-lora-rank {max_rank}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise AdapterLoadError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    settings["lora_alpha"] = float(alpha)
    for key in ("rank_pattern", "alpha_pattern"):
        if settings.get(key):
            raise AdapterLoadError(f"{path}: {key} (per-module ranks or alphas) is not supported")
    if settings.get("use_dora"):
        raise AdapterLoadError(f"{path}: use_dora (DoRA) is not supported")
    if settings.get("bias", "none") != "none":
        raise AdapterLoadError(f"{path}: bias {settings['bias']!r} is not supported (trained biases): use 'none'")
    if settings.get("modules_to_save"):
        raise AdapterLoadError(f"{path}: modules_to_save {settings['modules_to_save']!r} is not supported")
    if settings.get("fan_in_fan_out"):
        raise AdapterLoadError(f"{path}: fan_in_fan_out is not supported (ChatGLM3's linears are nn.Linear)")
    targets = settings.get("target_modules")
    if isinstance(targets, list):
        unknown = [t for t in targets if t not in LORA_MODULES]
        if unknown:
            raise AdapterLoadError(f"{path}: target_modules {unknown} are not supported (any of "
                                   f"{', '.join(LORA_MODULES)})")
    return settings


def _read_tensors(path: Path, config: ModelConfig, rank: int) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    shapes = module_shapes(config)
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    try:
        with ShardFile(path, "safetensors" if path.suffix == ".safetensors" else "bin") as shard:
            for tensor in shard.names():
                match = _TENSOR_NAME.match(tensor)
                if match is None:
                    raise AdapterLoadError(f"{path}: tensor {tensor!r} is not a LoRA weight of query_key_value, "
                                           "dense, dense_h_to_4h or dense_4h_to_h")
                layer, module, half = int(match[1]), _MODULE_BY_PATH[match[2]], match[3]
                if layer >= config.num_layers:
                    raise AdapterLoadError(f"{path}: tensor {tensor!r} is for layer {layer}, but the base model "
                                           f"has {config.num_layers} layers")
                in_features, out_features = shapes[module]
                expected = (rank, in_features) if half == "A" else (out_features, rank)
                if shard.shape(tensor) != expected:
                    raise AdapterLoadError(f"{path}: tensor {tensor!r} has shape {list(shard.shape(tensor))}, "
                                           f"expected {list(expected)} (r = {rank})")
                value = shard.read(tensor)
                if not value.is_floating_point() or not torch.isfinite(value).all():
                    raise AdapterLoadError(f"{path}: tensor {tensor!r} is not finite floating-point data")
                halves.setdefault((layer, module), {})[half] = value
    except CheckpointError as exc:
        raise AdapterLoadError(str(exc)) from None
    return halves
