"""kernels/cpu/native.py and availability.py: the library is built once and cached; without a compiler (or switched
off) the engine's backend choice falls back to torch; the "cpu" attention backend gives the torch backend's greedy
tokens."""
from __future__ import annotations

import logging
import os
import platform

import pytest
import torch

from glmserve.engine.attention import cpu_backend
from glmserve.engine.attention.backends import make_attention_backend
from glmserve.engine.attention.cpu_backend import CpuAttentionBackend
from glmserve.engine.attention.layer_ops import TORCH_LAYER_OPS
from glmserve.engine.attention.torch_backend import TorchAttentionBackend
from glmserve.engine.config.engine_config import EngineConfig
from glmserve.engine.config.errors import ConfigError
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.runtime.engine_core import EngineCore
from glmserve.kernels.cpu import attention as cpu_attention
from glmserve.kernels.cpu import fused_ops as cpu_ops
from glmserve.kernels.cpu import native as cpu_native
from glmserve.kernels.cpu.availability import native_cpu_available
from glmserve.kernels.cpu.attention import paged_decode_attention_cpu as cpu_attention_decode
from glmserve.kernels.reference.attention import paged_decode_attention_ref
from glmserve.kernels.reference.fused_ops import silu_mul_ref

from .engine_helpers import assert_no_leaks, make_engine, random_prompts, run_to_completion

needs_native = pytest.mark.skipif(not native_cpu_available(),
                                  reason="the native CPU kernels did not build here (no C compiler?)")


@needs_native
def test_library_is_built_once_per_cache_directory(tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_native.ENV_CACHE_DIR, str(tmp_path))
    compiler = cpu_native._compiler()
    first = cpu_native.build(compiler)
    assert first.parent == tmp_path / "native" and first.exists()
    built_at = first.stat().st_mtime_ns
    assert cpu_native.build(compiler) == first and first.stat().st_mtime_ns == built_at   # reused, not rebuilt
    assert list((tmp_path / "native").iterdir()) == [first]                             # no scratch left behind
    lib = cpu_native.load(first)                                                        # and it loads and agrees
    assert cpu_attention.self_check(lib) and cpu_ops.self_check(lib)


@pytest.mark.parametrize("how", ["no compiler", "switched off", "compiler fails"])
def test_without_the_library_everything_stays_in_torch(how, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv(cpu_native.ENV_CACHE_DIR, str(tmp_path))
    # What a fresh process finds: the library built and loaded now, not the copy this process already holds.
    monkeypatch.setattr(cpu_native, "library", cpu_native.load_library)
    if how == "no compiler":
        monkeypatch.setattr(cpu_native, "_compiler", lambda: None)
    elif how == "switched off":
        monkeypatch.setenv(cpu_native.ENV_SWITCH, "0")
        monkeypatch.setattr(cpu_native, "build", lambda *a: pytest.fail("built although switched off"))
    else:
        monkeypatch.setenv("CC", "false")
    with caplog.at_level(logging.INFO, logger=cpu_native.__name__):
        assert native_cpu_available() is False
    if how == "compiler fails":
        assert "native CPU kernels unavailable" in caplog.text
    auto = make_attention_backend("auto", torch.device("cpu"))
    assert isinstance(auto, TorchAttentionBackend) and not isinstance(auto, CpuAttentionBackend)
    assert auto.ops is TORCH_LAYER_OPS and not auto.onednn_linears      # the model's ops answer from torch
    with pytest.raises(ConfigError, match="GLMSERVE_NATIVE_CPU=0"):
        make_attention_backend("cpu", torch.device("cpu"))
    if how == "switched off":
        # The config is only data; the engine refuses the backend when it is built, with the same message.
        config = EngineConfig(model="glm-tiny", attention_backend="cpu")
        with pytest.raises(ConfigError, match="attention_backend 'cpu' needs its native kernel"):
            EngineCore(config)


def test_cpu_backend_is_refused_on_cuda():
    EngineConfig(model="glm-tiny", attention_backend="cpu", device="cuda")       # a config checks nothing here
    with pytest.raises(ConfigError, match="CPU only"):
        make_attention_backend("cpu", torch.device("cuda"))


@needs_native
def test_auto_picks_the_native_backend_on_the_cpu():
    assert isinstance(make_attention_backend("auto", torch.device("cpu")), CpuAttentionBackend)


@needs_native
def test_cpu_backend_gives_the_torch_backends_greedy_tokens(tiny_checkpoint):
    prompts = random_prompts(12, 2000, (1, 200), seed=5)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "cpu"):
        engine = make_engine(str(tiny_checkpoint), attention_backend=backend, max_num_batched_tokens=128)
        assert engine.runner.backend.name == backend
        arrivals = {i // 4: [] for i in range(len(prompts))}
        for i, prompt in enumerate(prompts):                   # staggered: decodes mix with prefill chunks
            arrivals[i // 4].append((f"r{i}", prompt, params))
        outputs[backend] = run_to_completion(engine, arrivals)
        assert_no_leaks(engine)
    assert outputs["cpu"] == outputs["torch"]


@needs_native
def test_a_bfloat16_model_runs_the_native_attention_with_the_torch_backends_tokens(tiny_checkpoint, monkeypatch):
    """bf16 on the CPU: the native kernels read the bf16 cache; the tokens are the torch backend's (whose attention
    also computes in float32 from the same bf16 values)."""
    calls = []
    monkeypatch.setattr(cpu_backend, "paged_decode_attention_cpu",
                        lambda *a, **k: calls.append(a[1].dtype) or cpu_attention_decode(*a, **k))
    prompts = random_prompts(6, 2000, (1, 120), seed=8)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "cpu"):
        engine = make_engine(str(tiny_checkpoint), attention_backend=backend, dtype="bfloat16")
        assert engine.runner.kv_caches[0][0].dtype == torch.bfloat16
        outputs[backend] = run_to_completion(engine, {0: [(f"r{i}", p, params) for i, p in enumerate(prompts)]})
        assert_no_leaks(engine)
    assert outputs["cpu"] == outputs["torch"]
    assert calls and set(calls) == {torch.bfloat16}


@needs_native
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the portable build is checked on x86")
def test_portable_build_without_avx2_agrees_with_torch(tmp_path, monkeypatch):
    """The C code's portable paths (what a CPU without AVX2 runs) built and checked here, whatever this CPU has."""
    monkeypatch.setenv(cpu_native.ENV_CACHE_DIR, str(tmp_path))
    flags = tuple("-march=x86-64" if flag == "-march=native" else flag for flag in cpu_native.COMPILE_FLAGS)
    portable = cpu_native.load(cpu_native.build(cpu_native._compiler(), flags))
    assert cpu_attention.self_check(portable) and cpu_ops.self_check(portable)
    generator = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, 9, 16, 2, 64, generator=generator)
    query = torch.randn(5, 8, 64, generator=generator)
    block_tables = torch.randperm(9, generator=generator)[:5 * 1].view(5, 1).to(torch.int32)
    seq_lens = torch.tensor([1, 16, 7, 3, 12], dtype=torch.int32)
    torch.testing.assert_close(
        cpu_attention.paged_decode_attention_cpu(query, k_cache, v_cache, block_tables, seq_lens, 0.125, lib=portable),
        paged_decode_attention_ref(query, k_cache, v_cache, block_tables, seq_lens, 0.125), rtol=1e-5, atol=1e-5)
    halves = [t.bfloat16() for t in (query, k_cache, v_cache)]
    torch.testing.assert_close(
        cpu_attention.paged_decode_attention_cpu(*halves, block_tables, seq_lens, 0.125, lib=portable),
        paged_decode_attention_ref(*(t.float() for t in halves), block_tables, seq_lens, 0.125).bfloat16(),
        rtol=2 ** -7, atol=1e-6)
    with torch.inference_mode():
        gate_up = torch.randn(4, 2 * 64, generator=generator) * 6
        torch.testing.assert_close(cpu_ops.silu_mul(gate_up, lib=portable), silu_mul_ref(gate_up), rtol=1e-5,
                                   atol=1e-6)


@needs_native
def test_an_unusable_cache_directory_falls_back_to_the_temporary_directory(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv(cpu_native.ENV_CACHE_DIR, str(blocker / "cache"))     # cannot be created under a file
    monkeypatch.setattr(cpu_native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    built = cpu_native.build(cpu_native._compiler())
    assert built.parent == tmp_path / "tmp" / f"glmserve-{os.getuid()}" / "native" and built.exists()
