"""glmserve's GLMForCausalLM against HF transformers' GlmForCausalLM (independent reference), fp32.

Tiny random models are written to disk in ChatGLM3 format and loaded through the real loader. Each check runs on
the pure-torch path (the ``torch`` backend, with the native library and oneDNN switched off as well: no native code
can run) and on the native CPU path (the ``cpu`` backend: oneDNN-packed linears, fused norm/rotary/SwiGLU, native KV
write and decode attention) where that builds.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from glmserve.engine.attention.cpu_backend import CpuAttentionBackend
from glmserve.engine.attention.layer_ops import TORCH_LAYER_OPS, NativeCpuLayerOps
from glmserve.engine.attention.torch_backend import TorchAttentionBackend
from glmserve.engine.model import cpu_linear
from glmserve.engine.model.checkpoint_writer import random_state_dict, write_checkpoint
from glmserve.engine.config.model_config import ModelConfig
from glmserve.engine.model.loader import load_model, resolve_model_source
from glmserve.engine.text.tokenizer import embedded_tokenizer_path
from glmserve.engine.model.glm import MLP, RMSNorm
from glmserve.kernels.cpu import native
from glmserve.kernels.cpu.availability import native_cpu_available

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
    """(our model, HF's, our attention backend). "torch": the native library and oneDNN switched off, and loading
    the library fails the test; "cpu": every linear is packed and runs oneDNN, however small."""
    if request.param == "torch":
        monkeypatch.setenv(native.ENV_SWITCH, "0")
        monkeypatch.setenv(cpu_linear.ENV_SWITCH, "0")
        monkeypatch.setattr(native, "library", lambda: pytest.fail("the torch path asked for the native library"))
    elif not native_cpu_available():
        pytest.skip("the native CPU kernels did not build here (no C compiler?)")
    else:
        monkeypatch.setattr(cpu_linear, "PACK_MIN_WEIGHT_ELEMENTS", 0)
        monkeypatch.setattr(cpu_linear, "MIN_MULTIPLY_ADDS", 0)
    ckpt, hf = checkpoint
    ours = load_model(resolve_model_source(str(ckpt)), torch.device("cpu"), torch.float32)
    return ours, hf, request.param


def _bind(model, backend: str, seed: int) -> PagedSequence:
    """A paged sequence over ``model`` bound to ``backend``, after checking that every layer runs that path."""
    seq = PagedSequence(model, block_size=16, seed=seed, backend=backend)
    attention = {type(attn.backend) for attn in model.attention_layers}
    ops = {type(m.ops) for m in model.modules() if isinstance(m, (RMSNorm, MLP))} | {type(model.rotary.ops)}
    linears = [m for m in model.modules() if isinstance(m, cpu_linear.Linear)]
    if backend == "torch":
        assert attention == {TorchAttentionBackend} and ops == {type(TORCH_LAYER_OPS)}
        assert not any(layer._packed is not None or layer.use_onednn for layer in linears)
    else:
        assert attention == {CpuAttentionBackend} and ops == {NativeCpuLayerOps}
        assert all(layer._packed is not None for layer in linears) and len(linears) == 1 + 4 * TINY.num_layers
    return seq


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(3, 256, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def test_prefill_and_cached_decode_logits_match(models):
    ours, hf, backend = models
    for length in PROMPT_LENGTHS:
        prompt = _prompt(length, seed=length)
        seq = _bind(ours, backend, seed=length)
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
    seq = _bind(ours, backend, seed=3)
    logits = seq.step(prompt)
    generated = []
    for _ in range(32):
        generated.append(int(logits[-1].argmax()))
        logits = seq.step([generated[-1]])
    assert generated == expected
