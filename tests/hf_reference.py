"""HF transformers' GlmForCausalLM built from ChatGLM3 weights: the independent reference of the tests.

The config and the weight mapping (GLM3_FACTS.md) live in ``glmserve.bench.common.hf_glm``, shared with the benchmarks.
"""
from __future__ import annotations

import torch

from glmserve.bench.common.hf_glm import hf_config, hf_state_dict
from glmserve.engine.config.model_config import ModelConfig


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
