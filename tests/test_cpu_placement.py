"""Splitting the cores between the engine core and its frontend, and binding a whole process to its share."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from glmserve.engine.runtime.cpu_placement import CpuPlacement, plan_cpu_placement


@pytest.fixture(autouse=True)
def _no_omp_setting(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def test_the_last_cores_go_to_the_frontend_the_others_to_the_engine():
    assert plan_cpu_placement("cpu", 1, {0, 1}) == CpuPlacement(frozenset({0}), frozenset({1}))
    assert plan_cpu_placement("cpu", 2, {4, 5, 6, 7, 9}) == CpuPlacement(frozenset({4, 5, 6}), frozenset({7, 9}))


@pytest.mark.parametrize("device, frontend_cpus, cores", [
    ("cuda", 1, {0, 1, 2, 3}),     # a GPU's engine core mostly waits on the GPU
    ("cuda:1", 1, {0, 1}),
    ("cpu", 0, {0, 1}),            # no cores reserved: the engine takes them all
    ("cpu", 1, {0}),               # one core: nothing to split
    ("cpu", 2, {0, 1}),            # the engine would get none
])
def test_nothing_is_bound_where_a_split_makes_no_sense(device, frontend_cpus, cores):
    assert plan_cpu_placement(device, frontend_cpus, cores) is None


def test_an_explicit_omp_setting_leaves_the_placement_to_the_user(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert plan_cpu_placement("cpu", 1, {0, 1, 2}) is None


def test_binding_covers_the_threads_already_running_and_returns_the_cores_before():
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("one core: nothing to bind to a subset")
    # In a fresh process: binding this one would change the cores of every later test.
    script = textwrap.dedent(f"""
        import json, os, threading
        from glmserve.engine.runtime.cpu_placement import bind_this_process
        started, stop = threading.Event(), threading.Event()
        def idle():
            started.set()
            stop.wait()
        threading.Thread(target=idle).start()
        started.wait()
        before = bind_this_process({{{cores[-1]}}})
        tasks = os.listdir("/proc/self/task")
        now = {{cpu for tid in tasks for cpu in os.sched_getaffinity(int(tid))}}
        print(json.dumps([len(tasks), sorted(before), sorted(now)]))
        stop.set()
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    threads, before, after = json.loads(out.stdout)
    assert threads >= 2 and before == cores and after == [cores[-1]]
