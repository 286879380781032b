"""The ChatGLM3 model config (the keys of config.json that change the computed function) and the model presets."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from glmserve.engine.config.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    """The keys of a ChatGLM3 ``config.json`` that change the computed function (names as in config.json)."""

    num_layers: int = 28
    hidden_size: int = 4096
    num_attention_heads: int = 32
    kv_channels: int = 128
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    ffn_hidden_size: int = 13696
    padded_vocab_size: int = 65024
    seq_length: int = 8192
    rope_ratio: float = 1.0
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    post_layer_norm: bool = True
    add_qkv_bias: bool = True
    add_bias_linear: bool = False
    apply_residual_connection_post_layernorm: bool = False
    torch_dtype: str = "float16"
    quantization_bit: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 0

    # ---- derived shapes -------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def num_kv_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        """Rotary covers the first half of each head (ChatGLM's 2D-RoPE heritage)."""
        return self.head_dim // 2

    @property
    def rope_base(self) -> float:
        # The 32K model raises the base; it does not interpolate positions.
        return 10000.0 * self.rope_ratio

    @property
    def max_model_len(self) -> int:
        return self.seq_length

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes

    def num_parameters(self) -> int:
        h, l = self.hidden_size, self.num_layers
        qkv = h * (self.q_size + 2 * self.kv_size) + (self.q_size + 2 * self.kv_size if self.add_qkv_bias else 0)
        per_layer = 2 * h + qkv + self.q_size * h + h * 2 * self.ffn_hidden_size + self.ffn_hidden_size * h
        return l * per_layer + h + 2 * self.padded_vocab_size * h

    # ---- validation and (de)serialisation -------------------------------------------------------------------
    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "kv_channels", "ffn_hidden_size",
                     "padded_vocab_size", "seq_length", "multi_query_group_num"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_kv_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"multi_query_group_num ({self.num_kv_heads})")
        if self.kv_channels % 4:
            raise ConfigError(f"config.json: kv_channels must be a multiple of 4, got {self.kv_channels}")
        if self.rope_ratio <= 0:
            raise ConfigError(f"config.json: rope_ratio must be > 0, got {self.rope_ratio}")
        if self.quantization_bit not in (0, 4, 8):
            raise ConfigError(f"config.json: quantization_bit must be 4 or 8 (or absent), got {self.quantization_bit}")
        if not self.rmsnorm or self.apply_residual_connection_post_layernorm or self.add_bias_linear:
            raise ConfigError("config.json: only the ChatGLM3 variant is supported "
                              "(rmsnorm=true, add_bias_linear=false, apply_residual_connection_post_layernorm=false)")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known and v is not None}
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, list):  # some exports store a list; the model's own eos is the first
            kwargs["eos_token_id"] = eos[0]
        kwargs.setdefault("quantization_bit", 0)
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a wrongly typed value
            raise ConfigError(f"config.json: {exc}") from None

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        if not os.path.isfile(path):
            raise ConfigError(f"missing config.json: {path} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_dict(raw)

    def to_hf_config_json(self) -> dict[str, Any]:
        """The config.json a ChatGLM3 checkpoint carries (with the extra keys the official files have)."""
        out: dict[str, Any] = {
            "_name_or_path": "THUDM/chatglm3-6b",
            "model_type": "chatglm",
            "architectures": ["ChatGLMModel"],
            "auto_map": {
                "AutoConfig": "configuration_chatglm.ChatGLMConfig",
                "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            },
            "attention_dropout": 0.0, "hidden_dropout": 0.0, "attention_softmax_in_fp32": True,
            "apply_query_key_layer_scaling": True, "bias_dropout_fusion": True, "fp32_residual_connection": False,
            "original_rope": True, "use_cache": True, "tie_word_embeddings": False, "transformers_version": "4.30.2",
        }
        for f in dataclasses.fields(self):
            out[f.name] = getattr(self, f.name)
        if self.rope_ratio == 1.0:
            del out["rope_ratio"]  # the 8K model's config has no rope_ratio key
        if not self.quantization_bit:
            del out["quantization_bit"]
        return out


# Exact shapes of the published models, and small ones for tests, demos and CPU benchmarks.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "chatglm3-6b": ModelConfig(),
    "chatglm3-6b-32k": ModelConfig(seq_length=32768, rope_ratio=50.0),
    # The embedded default model: small enough to serve hundreds of requests on 2 CPU cores.
    "glm-tiny": ModelConfig(num_layers=2, hidden_size=128, num_attention_heads=4, kv_channels=32,
                            multi_query_group_num=2, ffn_hidden_size=256, padded_vocab_size=4096,
                            seq_length=4096, torch_dtype="float32"),
    # The CPU benchmark model: ChatGLM3's real vocabulary, 4 layers, hidden 512.
    "glm-small": ModelConfig(num_layers=4, hidden_size=512, num_attention_heads=8, kv_channels=64,
                             multi_query_group_num=2, ffn_hidden_size=1368, padded_vocab_size=65024,
                             seq_length=8192, torch_dtype="float32"),
    # A small long-context model (rope_ratio 50) for the long-prompt check on CPU; 1K of headroom past 32K so a
    # full 32768-token prompt still leaves room to generate.
    "glm-small-32k": ModelConfig(num_layers=2, hidden_size=256, num_attention_heads=4, kv_channels=64,
                                 multi_query_group_num=2, ffn_hidden_size=512, padded_vocab_size=4096,
                                 seq_length=33792, rope_ratio=50.0, torch_dtype="float32"),
}


def preset_names() -> list[str]:
    return sorted(MODEL_PRESETS)
