"""Reading ChatGLM3 weight files: which files a checkpoint has, their tensors one shard at a time, and
dequantisation of weight-only quantized (int8 / int4) linears."""
from __future__ import annotations

import json
import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from glmserve.engine.model.shard_layout import TensorSlice


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file or tensor."""


SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_SINGLE = "pytorch_model.bin"

# Encoder linears that weight-only quantized checkpoints store as int8 data plus a per-row ``weight_scale``.
QUANTIZED_LINEARS = ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                     "mlp.dense_4h_to_h")
# Stored by the official checkpoints, unused by the computation.
IGNORED_TENSOR_SUFFIXES = ("rotary_pos_emb.inv_freq",)


@dataclass(frozen=True)
class WeightFiles:
    format: str              # "safetensors" | "bin"
    paths: list[Path]        # shard files in load order


def find_weight_files(checkpoint_dir: Path, load_format: str = "auto") -> WeightFiles:
    """Pick the weight files by which index (or single file) exists; ``auto`` prefers safetensors."""
    formats = ["safetensors", "bin"] if load_format == "auto" else [load_format]
    for fmt in formats:
        index, single = (SAFETENSORS_INDEX, SAFETENSORS_SINGLE) if fmt == "safetensors" else (BIN_INDEX, BIN_SINGLE)
        if (checkpoint_dir / index).is_file():
            return WeightFiles(fmt, _shards_from_index(checkpoint_dir, checkpoint_dir / index))
        if (checkpoint_dir / single).is_file():
            return WeightFiles(fmt, [checkpoint_dir / single])
    wanted = " or ".join(f"{SAFETENSORS_INDEX}/{SAFETENSORS_SINGLE}" if f == "safetensors" else f"{BIN_INDEX}/{BIN_SINGLE}"
                         for f in formats)
    raise CheckpointError(f"no weights found in {checkpoint_dir}: expected {wanted}")


def _shards_from_index(checkpoint_dir: Path, index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))     # unique, in first-seen order
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read weight index {index_path}: {exc!r}") from None
    paths = [checkpoint_dir / name for name in names]
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"weight shard {path} listed in {index_path.name} does not exist")
    return paths


class ShardFile:
    """One open weight file: its tensor names and full shapes, and reads of a whole tensor or of a TensorSlice.

    Sliced reads never materialise the full tensor: safetensors reads only the requested rows or columns
    (``get_slice``); a .bin file is memory-mapped, so only the pages of the slice are touched. Any read failure
    becomes a CheckpointError naming the file.
    """

    def __init__(self, path: Path, fmt: str):
        self.path = path
        self._safetensors = None
        self._state: dict[str, torch.Tensor] = {}
        with self._errors():
            if fmt == "safetensors":
                from safetensors import safe_open
                self._safetensors = safe_open(str(path), framework="pt", device="cpu")
            else:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
                if not isinstance(state, dict):
                    raise CheckpointError(f"cannot read weights file {path}: expected a dict of tensors")
                self._state = state

    def names(self) -> list[str]:
        return list(self._safetensors.keys()) if self._safetensors is not None else list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        with self._errors():
            if self._safetensors is not None:
                return tuple(self._safetensors.get_slice(name).get_shape())
            return tuple(self._state[name].shape)

    def read(self, name: str, piece: TensorSlice | None = None) -> torch.Tensor:
        """The whole tensor, or the ranges of ``piece`` concatenated along its dim."""
        with self._errors():
            if self._safetensors is None:
                return take_slice(self._state[name], piece)
            if piece is None:
                return self._safetensors.get_tensor(name)
            source = self._safetensors.get_slice(name)
            lead = (slice(None),) * piece.dim
            parts = [source[lead + (slice(start, stop),)] for start, stop in piece.ranges]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=piece.dim)

    def close(self) -> None:
        self._safetensors, self._state = None, {}    # safe_open handles close when dropped

    def __enter__(self) -> "ShardFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parser failure means an unreadable file
            raise CheckpointError(f"cannot read weights file {self.path}: {type(exc).__name__}: {exc}") from None


def take_slice(tensor: torch.Tensor, piece: TensorSlice | None) -> torch.Tensor:
    """The ranges of ``piece`` of an in-memory tensor, concatenated (the tensor itself for None)."""
    if piece is None:
        return tensor
    parts = [tensor.narrow(piece.dim, start, stop - start) for start, stop in piece.ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=piece.dim)


def quantized_storage_shape(shape: torch.Size, bits: int) -> tuple[int, ...]:
    """Stored shape of a quantized [out, in] weight: int4 packs two values a byte."""
    out_features, in_features = shape
    return (out_features, in_features // 2) if bits == 4 else (out_features, in_features)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """[out, in/2] bytes -> [out, in] int8 values in -8..7; two values a byte, high nibble first."""
    data = packed.to(torch.int8)
    high = data >> 4                       # arithmetic shift sign-extends the high nibble
    low = (data << 4) >> 4                 # shift the low nibble up, then back down to sign-extend it
    return torch.stack((high, low), dim=-1).flatten(-2)


def scale_rows(values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Symmetric per-row dequantisation of unpacked int8 values [out, in] with scale [out]."""
    return (values.float() * scale.float()[:, None]).to(dtype)


def dequantize(weight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """Symmetric per-row dequantisation. int4 packs two values a byte, high nibble first."""
    return scale_rows(unpack_int4(weight) if bits == 4 else weight.to(torch.int8), scale, dtype)


def quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``dequantize`` (for writing test checkpoints): int8 data and an fp16 per-row scale."""
    qmax = 127 if bits == 8 else 7
    scale = (weight.float().abs().amax(dim=1) / qmax).clamp_min(1e-8).half()
    q = torch.round(weight.float() / scale.float()[:, None]).clamp(-qmax, qmax).to(torch.int8)
    if bits == 4:
        pairs = q.unflatten(-1, (-1, 2))
        q = ((pairs[..., 0] << 4) | (pairs[..., 1] & 0x0F)).to(torch.int8)
    return q, scale
