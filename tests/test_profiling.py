"""KV-cache sizing from a profiling forward (engine/profiling.py, used on CUDA). Without a GPU the CUDA memory
counters are replaced by fakes: what runs for real is the full-size forward over a temporary paged cache and the
arithmetic that turns the measured peak into a block count."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from glmserve.engine.worker import profiling
from glmserve.engine.config.engine_config import CacheConfig, EngineConfig, SchedulerConfig
from glmserve.engine.runtime.engine_core import EngineCore
from glmserve.engine.model.loader import load_model, resolve_model_source
from glmserve.engine.worker.model_runner import ModelRunner

FAKE_PEAK = 10_000_000_000          # "bytes" the fake counter reports after the forward


@pytest.fixture
def fake_cuda_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: calls.append("peak") or FAKE_PEAK)
    return calls


def test_profiling_forward_runs_and_excludes_its_temporary_cache(fake_cuda_memory, tiny_checkpoint):
    source = resolve_model_source(str(tiny_checkpoint), "auto", None)
    model = load_model(source, torch.device("cpu"), torch.float32, seed=0)
    num_tokens, block_size = 100, 16
    peak = profiling.peak_forward_memory(model, num_tokens, block_size, "torch")
    cfg = model.config
    cache_bytes = 2 * cfg.num_layers * 7 * block_size * cfg.num_kv_heads * cfg.head_dim * 4   # ceil(100/16) = 7
    assert peak == FAKE_PEAK - cache_bytes
    assert fake_cuda_memory == ["reset", "peak"]          # the peak is read after the forward, reset before it


def test_engine_sizes_the_cache_from_the_card_minus_the_profiled_peak(monkeypatch, tiny_checkpoint):
    total = 80 * 1024 ** 3
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=total))
    engine = EngineCore.__new__(EngineCore)                    # only the sizing step, on a CPU model
    engine.config = EngineConfig(model=str(tiny_checkpoint), cache=CacheConfig(gpu_memory_utilization=0.5),
                                 scheduler=SchedulerConfig(max_num_batched_tokens=256))
    engine.executor = SimpleNamespace(peak_forward_memory=lambda model: 5 * 1024 ** 3)
    engine.device, engine.dtype = torch.device("cpu"), torch.float32
    source = resolve_model_source(str(tiny_checkpoint), "auto", None)
    model = load_model(source, torch.device("cpu"), torch.float32, seed=0)
    per_block = ModelRunner.kv_bytes_per_block(model.config, 16, torch.float32)
    blocks = engine._profile_cuda_blocks(model, per_block)
    assert blocks == (int(total * 0.5) - 5 * 1024 ** 3) // per_block
