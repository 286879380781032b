"""ChatGLM3 weights as HF transformers' ``GlmForCausalLM``: its config and the tensor-name mapping.

HF's GlmForCausalLM computes the ChatGLM3 function exactly (GLM3_FACTS.md, "Independent reference"), so the
benchmarks' HF baselines and the tests' reference both build it from here. transformers is imported lazily: it is a
``bench``/``test`` extra, not a dependency of the engine.
"""
from __future__ import annotations

import torch

from glmserve.engine.config.model_config import ModelConfig

# ChatGLM3's chat stop ids; GlmConfig's defaults are GLM-4's.
CHATGLM3_EOS_IDS = [2, 64795, 64797]


def hf_config(config: ModelConfig):
    """The ``GlmConfig`` of a ChatGLM3 model config."""
    from transformers import GlmConfig
    rope = {"rope_type": "default", "rope_theta": config.rope_base, "partial_rotary_factor": 0.5}
    kwargs = dict(
        vocab_size=config.padded_vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.layernorm_epsilon, attention_bias=True,
        # GlmConfig's default pad id (151329) is outside a 65024 vocabulary and crashes the embedding.
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=CHATGLM3_EOS_IDS, bos_token_id=None,
        max_position_embeddings=config.seq_length,
    )
    try:  # transformers >= 5 takes a rope_parameters dict
        return GlmConfig(rope_parameters=rope, **kwargs)
    except TypeError:
        return GlmConfig(rope_theta=config.rope_base, partial_rotary_factor=0.5, **kwargs)


def hf_state_dict(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ChatGLM3 checkpoint names -> GlmForCausalLM names (views, no copies). ``inv_freq`` is not needed."""
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": state["transformer.embedding.word_embeddings.weight"],
        "model.norm.weight": state["transformer.encoder.final_layernorm.weight"],
        "lm_head.weight": state["transformer.output_layer.weight"],
    }
    q, kv = config.q_size, config.kv_size
    # query_key_value rows are [Q | K | V], contiguous, not interleaved per group.
    qkv_rows = (("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)), ("v_proj", slice(q + kv, q + 2 * kv)))
    for i in range(config.num_layers):
        src, dst = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        weight = state[src + "self_attention.query_key_value.weight"]
        bias = state[src + "self_attention.query_key_value.bias"]
        for name, rows in qkv_rows:
            out[dst + f"self_attn.{name}.weight"] = weight[rows]
            out[dst + f"self_attn.{name}.bias"] = bias[rows]
        out[dst + "self_attn.o_proj.weight"] = state[src + "self_attention.dense.weight"]
        # Both put the gate in the first half of the fused projection: copied as is.
        out[dst + "mlp.gate_up_proj.weight"] = state[src + "mlp.dense_h_to_4h.weight"]
        out[dst + "mlp.down_proj.weight"] = state[src + "mlp.dense_4h_to_h.weight"]
        out[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "post_attention_layernorm.weight"]
    return out
