"""engine/attention: one forward (write K/V, decode the first ``num_decodes`` sequences, extend the rest) shared by
every backend; the backend is chosen once, when the engine is built; ``torch`` is pure torch (no native library, no
oneDNN), ``cpu`` is the native path; building a config compiles nothing; the switches are read at engine build."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import pytest
import torch

from glmserve.engine.attention.backend import AttentionBackend
from glmserve.engine.attention.backends import make_attention_backend
from glmserve.engine.attention.layer_ops import TORCH_LAYER_OPS, NativeCpuLayerOps
from glmserve.engine.attention.metadata import AttentionMetadata
from glmserve.engine.config.errors import ConfigError
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.entrypoints.llm import LLM
from glmserve.engine.model import cpu_linear
from glmserve.kernels.cpu import native
from glmserve.kernels.cpu.availability import checked_library, native_cpu_available
from glmserve.kernels.reference.attention import (paged_decode_attention_ref, paged_extend_attention_ref,
                                                  write_kv_cache_ref)

from .engine_helpers import assert_no_leaks, make_engine, random_prompts, run_to_completion

needs_native = pytest.mark.skipif(not native_cpu_available(),
                                  reason="the native CPU kernels did not build here (no C compiler?)")

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 4, 2, 32, 4


def _mixed_batch(seed: int = 0):
    """Two decodes, a chunk over a cached prefix, a whole prompt and two padding tokens (slot -1): the step's
    query/key/value, the caches holding every earlier token, and the metadata, as the runner builds them."""
    generator = torch.Generator().manual_seed(seed)
    seq_lens, query_lens = [9, 3, 14, 6], [1, 1, 5, 6]
    num_blocks = 20
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables, slots = [], []
    for length in seq_lens:
        count = -(-length // BLOCK_SIZE)
        table, order = order[:count], order[count:]
        tables.append(table + [0] * (4 - count))
        slots.append([table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(length)])
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=generator)
    v_cache = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, generator=generator)
    new_slots = [s for seq, n in zip(slots, query_lens) for s in seq[-n:]] + [-1, -1]
    tokens = len(new_slots)
    qkv = torch.randn(tokens, HEADS + 2 * KV_HEADS, HEAD_DIM, generator=generator)     # the engine's views
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=torch.tensor(new_slots), query_start_loc=starts,
                             seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
                             block_tables=torch.tensor(tables, dtype=torch.int32), num_decodes=2,
                             max_query_len=max(query_lens), max_seq_len=max(seq_lens))
    return qkv[:, :HEADS], qkv[:, HEADS:HEADS + KV_HEADS], qkv[:, HEADS + KV_HEADS:], k_cache, v_cache, meta


class RecordingBackend(AttentionBackend):
    """Records what the shared forward hands each step; decode rows get 1, extend rows 2."""

    name = "recording"
    ops = TORCH_LAYER_OPS

    def __init__(self):
        self.calls = []

    def write(self, key, value, k_cache, v_cache, slot_mapping):
        self.calls.append(("write", key.shape[0], slot_mapping.tolist()))

    def decode(self, query, k_cache, v_cache, block_tables, seq_lens, scale, *, max_seq_len, out):
        self.calls.append(("decode", query.shape[0], block_tables.shape[0], seq_lens.tolist(), max_seq_len))
        out.fill_(1)

    def extend(self, query, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, *, max_query_len,
               max_seq_len, out):
        self.calls.append(("extend", query.shape[0], block_tables.shape[0], query_start_loc.tolist(),
                           seq_lens.tolist(), max_query_len, max_seq_len))
        out.fill_(2)


def test_forward_writes_then_decodes_the_first_sequences_and_extends_the_rest():
    query, key, value, k_cache, v_cache, meta = _mixed_batch()
    backend = RecordingBackend()
    out = backend.forward(query, key, value, k_cache, v_cache, meta, 0.5)
    assert backend.calls == [
        ("write", 15, meta.slot_mapping.tolist()),
        ("decode", 2, 2, [9, 3], 14),
        ("extend", 13, 2, [0, 5, 11], [14, 6], 6, 14),      # offsets rebased onto the extend rows
    ]
    assert (out[:2] == 1).all() and (out[2:] == 2).all() and out.shape == query.shape
    backend.calls.clear()
    only_decodes = AttentionMetadata(meta.slot_mapping[:2], meta.query_start_loc[:3], meta.seq_lens[:2],
                                     meta.block_tables[:2], 2, 1, 9)
    backend.forward(query[:2], key[:2], value[:2], k_cache, v_cache, only_decodes, 0.5)
    assert [call[0] for call in backend.calls] == ["write", "decode"]


@pytest.mark.parametrize("name", ["torch", pytest.param("cpu", marks=needs_native)])
def test_backend_forward_matches_the_references_on_a_mixed_batch(name):
    query, key, value, k_cache, v_cache, meta = _mixed_batch(seed=1)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv_cache_ref(key, value, k_ref, v_ref, meta.slot_mapping)
    decode = paged_decode_attention_ref(query[:2], k_ref, v_ref, meta.block_tables[:2], meta.seq_lens[:2], 0.2)
    extend = paged_extend_attention_ref(query[2:], k_ref, v_ref, meta.block_tables[2:], meta.query_start_loc[2:] - 2,
                                        meta.seq_lens[2:], 0.2)
    backend = make_attention_backend(name, "cpu")
    assert backend.name == name
    out = backend.forward(query, key, value, k_cache, v_cache, meta, 0.2)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)     # padding tokens not written
    torch.testing.assert_close(out[:2], decode, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[2:13], extend[:11], rtol=1e-5, atol=1e-5)


def test_an_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="attention_backend must be auto, torch, cpu or triton, got 'flash'"):
        make_attention_backend("flash", "cpu")


# ---- which code runs --------------------------------------------------------------------------------------------

@pytest.fixture
def native_use(monkeypatch):
    """Records every use of native code: the C library (asked for, or any of its functions) and oneDNN linears.
    Every Linear would pack and run oneDNN however small, if its backend asked for it."""
    used = []
    real = checked_library() if native_cpu_available() else None

    class Spy:
        def __getattr__(self, name):
            used.append(name)
            return getattr(real, name)
    spy = Spy()
    monkeypatch.setattr(native, "library", lambda: used.append("library") or spy)
    onednn = cpu_linear._onednn_linear
    monkeypatch.setattr(cpu_linear, "_onednn_linear", lambda *a: used.append("oneDNN linear") or onednn(*a))
    monkeypatch.setattr(cpu_linear, "PACK_MIN_WEIGHT_ELEMENTS", 0)
    monkeypatch.setattr(cpu_linear, "MIN_MULTIPLY_ADDS", 0)
    return used


def _generate(backend: str):
    engine = make_engine("glm-tiny", attention_backend=backend, max_num_batched_tokens=48)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = random_prompts(3, 2000, (4, 60), seed=4)         # chunked prefills beside decodes
    tokens = run_to_completion(engine, {i: [(f"r{i}", prompt, params)] for i, prompt in enumerate(prompts)})
    assert_no_leaks(engine)
    assert all(len(t) == 6 for t in tokens.values())
    return engine, tokens


def _linears(engine):
    return [m for m in engine.runner.model.modules() if isinstance(m, cpu_linear.Linear)]


def test_the_torch_backend_runs_no_native_code(native_use):
    engine, _ = _generate("torch")
    assert engine.runner.backend.name == "torch" and engine.runner.backend.ops is TORCH_LAYER_OPS
    assert native_use == []
    assert not any(layer._packed is not None or layer.use_onednn for layer in _linears(engine))


@needs_native
def test_the_cpu_backend_runs_the_native_library_and_onednn(native_use):
    """The control of the test above: the same spies see the cpu backend's native calls."""
    engine, _ = _generate("cpu")
    assert isinstance(engine.runner.backend.ops, NativeCpuLayerOps)
    assert {"glmserve_paged_decode_f32", "glmserve_write_kv", "glmserve_rms_norm_f32", "glmserve_rotary_f32",
            "glmserve_silu_mul_f32", "oneDNN linear"} <= set(native_use)
    assert all(layer._packed is not None for layer in _linears(engine))


@needs_native
def test_the_switches_are_read_when_the_engine_is_built(monkeypatch):
    """GLMSERVE_NATIVE_CPU and GLMSERVE_ONEDNN_LINEAR take effect at the next engine build, both ways, in one
    process: nothing caches them."""
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    assert make_engine("glm-tiny", num_kv_blocks=8).runner.backend.name == "torch"
    monkeypatch.delenv(native.ENV_SWITCH)
    engine = make_engine("glm-tiny", num_kv_blocks=8)
    assert engine.runner.backend.name == "cpu"
    output_layer = engine.runner.model.transformer.output_layer      # 4096 x 128: large enough to pack
    assert output_layer._packed is not None
    monkeypatch.setenv(cpu_linear.ENV_SWITCH, "0")
    engine = make_engine("glm-tiny", num_kv_blocks=8)
    assert engine.runner.backend.name == "cpu" and not any(m._packed is not None for m in _linears(engine))
    monkeypatch.delenv(cpu_linear.ENV_SWITCH)
    assert make_engine("glm-tiny", num_kv_blocks=8).runner.model.transformer.output_layer._packed is not None


@pytest.mark.subprocess
def test_building_a_config_compiles_nothing(tmp_path):
    """In a fresh process (nothing built or cached yet): EngineConfig(attention_backend="cpu") imports no kernel
    module, runs no compiler and writes no library."""
    marker = tmp_path / "compiler-ran"
    compiler = tmp_path / "cc"
    compiler.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    compiler.chmod(0o755)
    code = ("import sys\n"
            "from glmserve.engine.config.engine_config import EngineConfig\n"
            "EngineConfig(model='glm-tiny', attention_backend='cpu')\n"
            "print(sorted(name for name in sys.modules if name.startswith('glmserve.kernels')))\n")
    env = {**os.environ, "CC": str(compiler), native.ENV_CACHE_DIR: str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert not marker.exists() and not (tmp_path / "cache").exists()
    # The same compiler is what building the engine's backend would run: the check above could fail.
    code = ("from glmserve.kernels.cpu.availability import native_cpu_available\n"
            "print(native_cpu_available())\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.stdout.strip() == "False" and marker.exists()


@pytest.mark.tensor_parallel
def test_a_tensor_parallel_engine_refuses_the_cpu_backend_before_its_workers_build(monkeypatch):
    """The check moved from the config to the engine build: with workers it is still one clear ConfigError (rank 0
    builds its backend first), and the workers are stopped."""
    monkeypatch.setenv(native.ENV_SWITCH, "0")          # inherited by the spawned worker
    with pytest.raises(ConfigError, match="attention_backend 'cpu' needs its native kernel"):
        LLM("glm-tiny", tensor_parallel_size=2, attention_backend="cpu", num_kv_blocks=16)
    assert not [child for child in multiprocessing.active_children() if child.is_alive()]
