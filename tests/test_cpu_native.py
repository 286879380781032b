"""kernels/cpu_native.py: the library is built once and cached; without a compiler (or switched off) everything
falls back to torch with the same results; the "cpu" attention backend gives the torch backend's greedy tokens."""
from __future__ import annotations

import logging
import os
import platform

import pytest
import torch

from glmserve.engine.attention.backends import CpuAttentionBackend, TorchAttentionBackend, make_attention_backend
from glmserve.engine.config.engine_config import EngineConfig
from glmserve.engine.config.errors import ConfigError
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.kernels.cpu import native as cpu_native
from glmserve.kernels.cpu import fused_ops as cpu_ops
from glmserve.kernels.cpu.attention import paged_decode_attention_cpu as cpu_attention_decode

from .engine_helpers import assert_no_leaks, make_engine, random_prompts, run_to_completion

needs_native = pytest.mark.skipif(not cpu_native.native_cpu_available(),
                                  reason="the native CPU kernels did not build here (no C compiler?)")


@pytest.fixture
def fresh_native_state():
    """Forget the process-wide library and self-check, before and after the test."""
    cpu_native.library.cache_clear()
    cpu_native.native_cpu_available.cache_clear()
    yield
    cpu_native.library.cache_clear()
    cpu_native.native_cpu_available.cache_clear()


@needs_native
def test_library_is_built_once_per_cache_directory(tmp_path, monkeypatch, fresh_native_state):
    monkeypatch.setenv(cpu_native.ENV_CACHE_DIR, str(tmp_path))
    compiler = cpu_native._compiler()
    first = cpu_native.build(compiler)
    assert first.parent == tmp_path / "native" and first.exists()
    built_at = first.stat().st_mtime_ns
    assert cpu_native.build(compiler) == first and first.stat().st_mtime_ns == built_at   # reused, not rebuilt
    assert list((tmp_path / "native").iterdir()) == [first]                             # no scratch left behind
    assert cpu_native.native_cpu_available()                                            # and it loads and agrees


@pytest.mark.parametrize("how", ["no compiler", "switched off", "compiler fails"])
def test_without_the_library_everything_stays_in_torch(how, monkeypatch, tmp_path, fresh_native_state, caplog):
    monkeypatch.setenv(cpu_native.ENV_CACHE_DIR, str(tmp_path))
    if how == "no compiler":
        monkeypatch.setattr(cpu_native, "_compiler", lambda: None)
    elif how == "switched off":
        monkeypatch.setenv(cpu_native.ENV_SWITCH, "0")
    else:
        monkeypatch.setenv("CC", "false")
    with caplog.at_level(logging.INFO, logger=cpu_native.__name__):
        assert cpu_native.native_cpu_available() is False
    if how == "compiler fails":
        assert "native CPU kernels unavailable" in caplog.text
    assert isinstance(make_attention_backend("auto", torch.device("cpu")), TorchAttentionBackend)
    assert not isinstance(make_attention_backend("auto", torch.device("cpu")), CpuAttentionBackend)
    with pytest.raises(ConfigError, match="GLMSERVE_NATIVE_CPU=0"):
        EngineConfig(model="glm-tiny", attention_backend="cpu")
    with torch.inference_mode():                       # the fused ops answer from torch
        x = torch.randn(2, 8)
        assert torch.equal(cpu_ops.add_rms_norm(x, None, torch.ones(8), 1e-5)[1],
                           cpu_ops.rms_norm_ref(x, torch.ones(8), 1e-5))


def test_cpu_backend_is_refused_on_cuda():
    with pytest.raises(ConfigError, match="CPU only"):
        EngineConfig(model="glm-tiny", attention_backend="cpu", device="cuda")


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
    from glmserve.engine.attention import backends as attention
    calls = []
    monkeypatch.setattr(attention, "paged_decode_attention_cpu",
                        lambda *a: calls.append(a[1].dtype) or cpu_attention_decode(*a))
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
    from glmserve.kernels.cpu import attention as cpu_attention
    from glmserve.kernels.reference.attention import paged_decode_attention_ref

    monkeypatch.setenv(cpu_native.ENV_CACHE_DIR, str(tmp_path))
    flags = tuple("-march=x86-64" if flag == "-march=native" else flag for flag in cpu_native.COMPILE_FLAGS)
    portable = cpu_native.load(cpu_native.build(cpu_native._compiler(), flags))
    monkeypatch.setattr(cpu_attention, "library", lambda: portable)
    monkeypatch.setattr(cpu_ops, "library", lambda: portable)
    assert cpu_attention.self_check() and cpu_ops.self_check()
    generator = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, 9, 16, 2, 64, generator=generator)
    query = torch.randn(5, 8, 64, generator=generator)
    block_tables = torch.randperm(9, generator=generator)[:5 * 1].view(5, 1).to(torch.int32)
    seq_lens = torch.tensor([1, 16, 7, 3, 12], dtype=torch.int32)
    torch.testing.assert_close(
        cpu_attention.paged_decode_attention_cpu(query, k_cache, v_cache, block_tables, seq_lens, 0.125),
        paged_decode_attention_ref(query, k_cache, v_cache, block_tables, seq_lens, 0.125), rtol=1e-5, atol=1e-5)
    halves = [t.bfloat16() for t in (query, k_cache, v_cache)]
    torch.testing.assert_close(
        cpu_attention.paged_decode_attention_cpu(*halves, block_tables, seq_lens, 0.125),
        paged_decode_attention_ref(*(t.float() for t in halves), block_tables, seq_lens, 0.125).bfloat16(),
        rtol=2 ** -7, atol=1e-6)
    with torch.inference_mode():
        gate_up = torch.randn(4, 2 * 64, generator=generator) * 6
        torch.testing.assert_close(cpu_ops.silu_mul(gate_up), cpu_ops.silu_mul_ref(gate_up), rtol=1e-5, atol=1e-6)


@needs_native
def test_an_unusable_cache_directory_falls_back_to_the_temporary_directory(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv(cpu_native.ENV_CACHE_DIR, str(blocker / "cache"))     # cannot be created under a file
    monkeypatch.setattr(cpu_native.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    built = cpu_native.build(cpu_native._compiler())
    assert built.parent == tmp_path / "tmp" / f"glmserve-{os.getuid()}" / "native" and built.exists()
