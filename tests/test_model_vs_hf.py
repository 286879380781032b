"""glmserve's GLMForCausalLM against HF transformers' GlmForCausalLM (independent reference), fp32.

Tiny random models are written to disk in ChatGLM3 format and loaded through the real loader. Each check runs on
the plain torch path and on the native CPU path (oneDNN-packed linears, fused norm/rotary/SwiGLU, native KV write
and decode attention) where that builds.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from glmserve.engine.model import cpu_linear
from glmserve.engine.model.checkpoint_writer import random_state_dict, write_checkpoint
from glmserve.engine.config.model_config import ModelConfig
from glmserve.engine.model.loader import load_model, resolve_model_source
from glmserve.engine.text.tokenizer import embedded_tokenizer_path
from glmserve.kernels.cpu.native import native_cpu_available

from .hf_reference import build_hf_model, hf_greedy
from .paged_forward import PagedSequence

pytest.importorskip("transformers")

TINY = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, multi_query_group_num=2,
                   ffn_hidden_size=96, padded_vocab_size=256, seq_length=2048, torch_dtype="float32")
# (rope_ratio, groups): cover rope_ratio 1 and 50, and 1, 2 and 4 KV groups.
VARIANTS = [(1.0, 2), (50.0, 2), (1.0, 1), (50.0, 4)]
PROMPT_LENGTHS = (5, 16, 37)   # inside one block, exactly one block, crossing two block boundaries


@pytest.fixture(scope="module", params=VARIANTS, ids=lambda v: f"rope{v[0]:g}-groups{v[1]}")
def checkpoint(request, tmp_path_factory):
    rope_ratio, groups = request.param
    config = dataclasses.replace(TINY, rope_ratio=rope_ratio, multi_query_group_num=groups)
    state = random_state_dict(config, seed=1, dtype=torch.float32)
    ckpt = write_checkpoint(tmp_path_factory.mktemp("ckpt"), config, embedded_tokenizer_path(), state=state)
    return ckpt, build_hf_model(config, state)


@pytest.fixture(params=["torch", "cpu"])
def models(request, checkpoint, monkeypatch):
    """(our model, HF's, our attention backend); for "cpu" every linear is packed, however small."""
    if request.param == "cpu" and not native_cpu_available():
        pytest.skip("the native CPU kernels did not build here (no C compiler?)")
    ckpt, hf = checkpoint
    ours = load_model(resolve_model_source(str(ckpt)), torch.device("cpu"), torch.float32)
    if request.param == "cpu":
        monkeypatch.setattr(cpu_linear, "PACK_MIN_WEIGHT_ELEMENTS", 0)
        assert ours.pack_for_cpu_inference() == 1 + 4 * TINY.num_layers
    return ours, hf, request.param


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def test_prefill_and_cached_decode_logits_match(models):
    ours, hf, backend = models
    for length in PROMPT_LENGTHS:
        prompt = _prompt(length, seed=length)
        seq = PagedSequence(ours, block_size=16, seed=length, backend=backend)
        got = seq.step(prompt)
        ref = hf(torch.tensor([prompt])).logits[0].float()
        assert (got - ref).abs().max().item() <= 1e-4, f"prefill of {length} tokens"
        # 16 cached decode steps: feed HF's own greedy choice to both and compare every step's logits.
        tokens = list(prompt)
        for _ in range(16):
            tokens.append(int(ref[-1].argmax()))
            got = seq.step([tokens[-1]])
            ref = hf(torch.tensor([tokens])).logits[0].float()
            assert (got[-1] - ref[-1]).abs().max().item() <= 1e-4, f"decode at length {len(tokens)}"


@torch.no_grad()
def test_32_greedy_tokens_identical(models):
    ours, hf, backend = models
    prompt = _prompt(21, seed=7)
    expected = hf_greedy(hf, prompt, 32)
    seq = PagedSequence(ours, block_size=16, seed=3, backend=backend)
    logits = seq.step(prompt)
    generated = []
    for _ in range(32):
        generated.append(int(logits[-1].argmax()))
        logits = seq.step([generated[-1]])
    assert generated == expected
