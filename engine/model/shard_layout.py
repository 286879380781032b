"""Which part of each ChatGLM3 tensor one tensor-parallel rank holds.

Megatron-style split over N ranks:
- column-parallel (output rows split): ``query_key_value`` and ``dense_h_to_4h``;
- row-parallel (input columns split, partial outputs all-reduced): ``dense`` and ``dense_4h_to_h``;
- vocabulary-parallel (rows split): ``word_embeddings`` and ``output_layer``;
- replicated: the RMSNorm weights.

The fused layouts need care. ``query_key_value`` rows are [Q heads | K groups | V groups], so a rank takes three
row ranges: its query heads, and the K and V of the KV groups those heads read. ``dense_h_to_4h`` rows are
[gate (ffn) | up (ffn)], so a rank takes its slice of the gate half AND the matching slice of the up half.

KV groups are split when ``groups % N == 0``; when N is a multiple of ``groups`` (ChatGLM3 has 2 groups, so N = 4
or 8) each rank holds the one group its query heads use, replicated across the ranks that share it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from glmserve.engine.config.errors import ConfigError

from glmserve.engine.config.model_config import ModelConfig


@dataclass(frozen=True)
class TensorSlice:
    """The rank's part of a checkpoint tensor: these ranges along ``dim``, concatenated in order."""

    dim: int
    ranges: tuple[tuple[int, int], ...]     # (start, stop) pairs


def validate_tensor_parallel(config: ModelConfig, world_size: int) -> None:
    """A clear ConfigError when the model cannot be split over ``world_size`` ranks."""
    n = world_size
    heads, groups = config.num_attention_heads, config.num_kv_heads
    if n < 1:
        raise ConfigError(f"tensor_parallel_size must be >= 1, got {n}")
    if heads % n:
        raise ConfigError(f"tensor_parallel_size {n} must divide num_attention_heads ({heads})")
    if groups % n and n % groups:
        raise ConfigError(f"tensor_parallel_size {n} must divide the number of KV groups ({groups}) or be a "
                          f"multiple of it (then each rank holds a replica of the group its query heads use)")
    for name in ("ffn_hidden_size", "padded_vocab_size"):
        if getattr(config, name) % n:
            raise ConfigError(f"tensor_parallel_size {n} must divide {name} ({getattr(config, name)})")


@dataclass(frozen=True)
class ShardLayout:
    """Rank ``rank`` of ``world_size`` for the (full) checkpoint config ``config``."""

    config: ModelConfig
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        validate_tensor_parallel(self.config, self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is outside tensor_parallel_size {self.world_size}")

    # ---- this rank's share of each dimension -----------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads // self.world_size

    @property
    def first_head(self) -> int:
        return self.rank * self.num_heads

    @property
    def num_kv_heads(self) -> int:
        groups = self.config.num_kv_heads
        return groups // self.world_size if groups % self.world_size == 0 else 1

    @property
    def first_kv_head(self) -> int:
        # The group of this rank's first query head (query head h reads group h // (heads / groups)).
        heads_per_group = self.config.num_attention_heads // self.config.num_kv_heads
        return self.first_head // heads_per_group

    @property
    def ffn_size(self) -> int:
        return self.config.ffn_hidden_size // self.world_size

    @property
    def vocab_size(self) -> int:
        return self.config.padded_vocab_size // self.world_size

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_size

    @property
    def local_config(self) -> ModelConfig:
        """The dimensions the rank's modules hold (heads, KV groups, ffn and vocabulary rows divided by N)."""
        if self.world_size == 1:
            return self.config
        return dataclasses.replace(self.config, num_attention_heads=self.num_heads,
                                   multi_query_group_num=self.num_kv_heads, ffn_hidden_size=self.ffn_size,
                                   padded_vocab_size=self.vocab_size)

    # ---- which rows or columns of a checkpoint tensor ----------------------------------------------------------
    def tensor_slice(self, name: str) -> TensorSlice | None:
        """The rank's part of checkpoint tensor ``name`` (a parameter name); None when it holds all of it."""
        if self.world_size == 1:
            return None
        d, f = self.config.head_dim, self.ffn_size
        q = (self.first_head * d, (self.first_head + self.num_heads) * d)
        if name.endswith("self_attention.query_key_value.weight") or name.endswith(
                "self_attention.query_key_value.bias"):
            k_base, v_base = self.config.q_size, self.config.q_size + self.config.kv_size
            kv = (self.first_kv_head * d, (self.first_kv_head + self.num_kv_heads) * d)
            return TensorSlice(0, (q, (k_base + kv[0], k_base + kv[1]), (v_base + kv[0], v_base + kv[1])))
        if name.endswith("self_attention.dense.weight"):
            return TensorSlice(1, (q,))
        if name.endswith("mlp.dense_h_to_4h.weight"):
            gate = (self.rank * f, (self.rank + 1) * f)
            full = self.config.ffn_hidden_size
            return TensorSlice(0, (gate, (full + gate[0], full + gate[1])))
        if name.endswith("mlp.dense_4h_to_h.weight"):
            return TensorSlice(1, ((self.rank * f, (self.rank + 1) * f),))
        if name.endswith(("word_embeddings.weight", "output_layer.weight")):
            return TensorSlice(0, ((self.vocab_start, self.vocab_start + self.vocab_size),))
        return None   # RMSNorm weights: replicated
