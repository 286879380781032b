"""Reading a ChatGLM3 P-tuning v2 checkpoint and computing its prefix K/V once.

The checkpoint (ChatGLM2/3's P-tuning v2 scripts): ``config.json`` with ``pre_seq_len`` (P) and ``prefix_projection``
beside weights (``pytorch_model.bin`` usually; any layout ``find_weight_files`` reads) holding
``transformer.prefix_encoder.*``; other tensors (a whole saved model) are ignored, as the official loading code does.

The prefix encoder (``kv_size = num_layers * kv_channels * multi_query_group_num * 2``):
- ``prefix_projection`` false: ``embedding.weight`` [P, kv_size] is the prefix;
- true: ``embedding.weight`` [P, kv_size] -> ``trans.0`` Linear(kv_size, hidden) -> tanh -> ``trans.2``
  Linear(hidden, kv_size).
Its output [P, kv_size] viewed as [P, num_layers * 2, groups, kv_channels]: layer i's keys are entry 2i, its values
entry 2i + 1. They are used as stored (no rotary) as the layer's past K/V in front of every prompt, whose positions
still start at 0. Dropout is training-only.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from glmserve.engine.config.model_config import ModelConfig
from glmserve.engine.core.adapters import AdapterLoadError
from glmserve.engine.model.weights import CheckpointError, ShardFile, find_weight_files

PREFIX = "transformer.prefix_encoder."
# config.json keys a P-tuning checkpoint repeats from its base model: they must agree with the served model.
_SHAPE_KEYS = ("num_layers", "hidden_size", "kv_channels", "multi_query_group_num")


@dataclass
class PrefixKV:
    """A fine-tune's prefix, float32 on the host: keys and values [num_layers, P, groups, kv_channels]."""

    name: str
    path: Path
    pre_seq_len: int
    prefix_projection: bool
    keys: torch.Tensor
    values: torch.Tensor


def is_ptuning_checkpoint(path: Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("pre_seq_len") is not None
    except (OSError, ValueError, AttributeError):
        return False


def load_ptuning_prefix(name: str, path: str | Path, config: ModelConfig) -> PrefixKV:
    """Read a P-tuning v2 checkpoint and compute its prefix K/V; raises AdapterLoadError naming the file at fault."""
    folder = Path(path)
    pre_seq_len, projection = _read_config(folder / "config.json", config)
    kv_size = config.num_layers * config.kv_channels * config.multi_query_group_num * 2
    expected = {"embedding.weight": (pre_seq_len, kv_size)}
    if projection:
        expected.update({"trans.0.weight": (config.hidden_size, kv_size), "trans.0.bias": (config.hidden_size,),
                         "trans.2.weight": (kv_size, config.hidden_size), "trans.2.bias": (kv_size,)})
    tensors, source = _read_tensors(folder, expected)
    with torch.no_grad():
        prefix = tensors["embedding.weight"].float()                                        # [P, kv_size]
        if projection:
            hidden = torch.tanh(torch.nn.functional.linear(prefix, tensors["trans.0.weight"].float(),
                                                           tensors["trans.0.bias"].float()))
            prefix = torch.nn.functional.linear(hidden, tensors["trans.2.weight"].float(),
                                                tensors["trans.2.bias"].float())
    if not torch.isfinite(prefix).all():
        raise AdapterLoadError(f"{source}: the prefix encoder's output is not finite")
    kv = prefix.view(pre_seq_len, config.num_layers * 2, config.multi_query_group_num, config.kv_channels)
    kv = kv.permute(1, 0, 2, 3)                              # [num_layers * 2, P, groups, kv_channels]
    return PrefixKV(name, folder, pre_seq_len, projection, kv[0::2].contiguous(), kv[1::2].contiguous())


def _read_config(path: Path, config: ModelConfig) -> tuple[int, bool]:
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"cannot read {path}: {exc}") from None
    if not isinstance(settings, dict):
        raise AdapterLoadError(f"{path}: expected a JSON object")
    pre_seq_len = settings.get("pre_seq_len")
    if not isinstance(pre_seq_len, int) or isinstance(pre_seq_len, bool) or pre_seq_len < 1:
        raise AdapterLoadError(f"{path}: pre_seq_len must be a positive integer, got {pre_seq_len!r}")
    projection = settings.get("prefix_projection", False)
    if not isinstance(projection, bool):
        raise AdapterLoadError(f"{path}: prefix_projection must be true or false, got {projection!r}")
    for key in _SHAPE_KEYS:
        if key in settings and settings[key] != getattr(config, key):
            raise AdapterLoadError(f"{path}: {key} is {settings[key]!r}, but the served model's is "
                                   f"{getattr(config, key)!r}")
    return pre_seq_len, projection


def _read_tensors(folder: Path, expected: dict[str, tuple[int, ...]]) -> tuple[dict[str, torch.Tensor], Path]:
    found: dict[str, torch.Tensor] = {}
    try:
        files = find_weight_files(folder)
        for file in files.paths:
            with ShardFile(file, files.format) as shard:
                for tensor in shard.names():
                    if not tensor.startswith(PREFIX):
                        continue
                    key = tensor[len(PREFIX):]
                    if key not in expected:
                        raise AdapterLoadError(f"{file}: unexpected tensor {tensor!r} for this prefix encoder "
                                               f"(prefix_projection {'true' if len(expected) > 1 else 'false'})")
                    if shard.shape(tensor) != expected[key]:
                        raise AdapterLoadError(f"{file}: tensor {tensor!r} has shape {list(shard.shape(tensor))}, "
                                               f"expected {list(expected[key])}")
                    value = shard.read(tensor)
                    if not value.is_floating_point():
                        raise AdapterLoadError(f"{file}: tensor {tensor!r} is not floating-point data")
                    found[key] = value
    except CheckpointError as exc:
        raise AdapterLoadError(str(exc)) from None
    missing = [PREFIX + key for key in expected if key not in found]
    if missing:
        raise AdapterLoadError(f"{files.paths[0] if len(files.paths) == 1 else folder}: tensor {missing[0]!r} is "
                               "missing")
    return found, files.paths[0] if len(files.paths) == 1 else folder
