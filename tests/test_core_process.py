"""The engine core in its own process: on the CPU its torch threads leave cores to the frontend process, or it is
bound to the cores it is given."""
from __future__ import annotations

import os

import pytest

from glmserve.engine.config.engine_config import CacheConfig, EngineConfig
from glmserve.engine.runtime.core_client import ProcessEngineCore

pytestmark = pytest.mark.subprocess


def _threads(frontend_cpus: int) -> int:
    core = ProcessEngineCore(EngineConfig(model="glm-tiny", attention_backend="torch",
                                          cache=CacheConfig(num_kv_blocks=64)), frontend_cpus=frontend_cpus)
    try:
        return core.wait_ready().info.cpu_threads
    finally:
        core.shutdown()


def test_the_engine_core_leaves_cpus_to_its_frontend(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    all_cores = _threads(0)
    assert all_cores >= 1                             # a fresh process takes every core by default
    assert _threads(1) == max(1, all_cores - 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")        # an explicit setting wins
    assert _threads(0) == 1


def test_engine_cpus_bind_the_engine_core_with_one_torch_thread_a_core(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    first = min(os.sched_getaffinity(0))
    core = ProcessEngineCore(EngineConfig(model="glm-tiny", attention_backend="torch",
                                          cache=CacheConfig(num_kv_blocks=64)), engine_cpus=frozenset({first}))
    try:
        assert core.wait_ready().info.cpu_threads == 1
        assert os.sched_getaffinity(core.pid) == {first}
        assert os.sched_getaffinity(0) != {first} or len(os.sched_getaffinity(0)) == 1   # this process is left alone
    finally:
        core.shutdown()
