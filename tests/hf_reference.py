"""HF transformers' GlmForCausalLM built from a ChatGLM3 checkpoint: the independent reference of the tests.

The weight mapping follows GLM3_FACTS.md: query_key_value rows split into q/k/v, dense -> o_proj,
dense_h_to_4h -> gate_up_proj as is, dense_4h_to_h -> down_proj, norms by name.
"""
from __future__ import annotations

import torch

from glmserve.engine.config import ModelConfig


def hf_config(config: ModelConfig):
    from transformers import GlmConfig
    rope = {"rope_type": "default", "rope_theta": config.rope_base, "partial_rotary_factor": 0.5}
    kwargs = dict(
        vocab_size=config.padded_vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim, rms_norm_eps=config.layernorm_epsilon, attention_bias=True,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=[2, 64795, 64797], bos_token_id=None,
        max_position_embeddings=config.seq_length,
    )
    try:  # transformers >= 5 takes a rope_parameters dict
        return GlmConfig(rope_parameters=rope, **kwargs)
    except TypeError:
        return GlmConfig(rope_theta=config.rope_base, partial_rotary_factor=0.5, **kwargs)


def hf_state_dict(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": state["transformer.embedding.word_embeddings.weight"],
        "model.norm.weight": state["transformer.encoder.final_layernorm.weight"],
        "lm_head.weight": state["transformer.output_layer.weight"],
    }
    q, kv = config.q_size, config.kv_size
    for i in range(config.num_layers):
        src, dst = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        w = state[src + "self_attention.query_key_value.weight"]
        b = state[src + "self_attention.query_key_value.bias"]
        for name, rows in (("q_proj", slice(0, q)), ("k_proj", slice(q, q + kv)), ("v_proj", slice(q + kv, q + 2 * kv))):
            out[dst + f"self_attn.{name}.weight"] = w[rows]
            out[dst + f"self_attn.{name}.bias"] = b[rows]
        out[dst + "self_attn.o_proj.weight"] = state[src + "self_attention.dense.weight"]
        out[dst + "mlp.gate_up_proj.weight"] = state[src + "mlp.dense_h_to_4h.weight"]
        out[dst + "mlp.down_proj.weight"] = state[src + "mlp.dense_4h_to_h.weight"]
        out[dst + "input_layernorm.weight"] = state[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = state[src + "post_attention_layernorm.weight"]
    return out


def build_hf_model(config: ModelConfig, state: dict[str, torch.Tensor], dtype=torch.float32):
    from transformers import GlmForCausalLM
    model = GlmForCausalLM(hf_config(config))
    missing, unexpected = model.load_state_dict(hf_state_dict(config, state), strict=False)
    assert not unexpected, unexpected
    assert not [m for m in missing if "rotary" not in m], missing
    return model.to(dtype).eval()


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int, vocab_size: int | None = None) -> list[int]:
    """Greedy continuation; ids >= ``vocab_size`` (embedding padding) are suppressed as the engine does."""
    ids = torch.tensor([prompt])
    padded = model.config.vocab_size
    suppress = list(range(vocab_size, padded)) if vocab_size and vocab_size < padded else None
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=None, pad_token_id=0, min_new_tokens=max_new_tokens,
                         suppress_tokens=suppress)
    return out[0, len(prompt):].tolist()
