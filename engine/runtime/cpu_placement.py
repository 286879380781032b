"""Which cores the engine core and its frontend run on, on a CPU-only machine.

The engine core's torch threads want whole cores: an OpenMP thread that the kernel preempts for a frontend thread
stalls every parallel op of the step, and even with one thread fewer than the cores (``frontend_cpus``), the
kernel still moves the frontend's threads (the event loop, gRPC's and the HTTP server's, a co-located client's)
onto the engine's cores whenever they wake together, taking a slice of every step. Binding each process to its
own cores ends that, as vLLM's CPU backend binds its OpenMP threads and reserves cores for its API server.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuPlacement:
    engine: frozenset[int]      # the engine core process (one torch thread per core) and its workers
    frontend: frozenset[int]    # the frontend process: its servers, AsyncEngine, and the processes it starts


def plan_cpu_placement(device: str, frontend_cpus: int, available: set[int] | None = None) -> CpuPlacement | None:
    """The last ``frontend_cpus`` of the cores this process may use go to the frontend, the others to the engine
    core. None where nothing should be bound: a GPU device (its engine core mostly waits on the GPU), no cores
    reserved, an explicit OMP_NUM_THREADS (the user places the threads), a platform without CPU affinity, or too
    few cores to leave the engine one."""
    if not device.startswith("cpu") or frontend_cpus <= 0 or os.environ.get("OMP_NUM_THREADS"):
        return None
    if available is None:
        if not hasattr(os, "sched_getaffinity"):
            return None
        available = os.sched_getaffinity(0)
    cores = sorted(available)
    if len(cores) <= frontend_cpus:
        return None
    return CpuPlacement(frozenset(cores[:-frontend_cpus]), frozenset(cores[-frontend_cpus:]))


def bind_this_process(cpus: frozenset[int] | set[int]) -> frozenset[int]:
    """Bind every thread of this process to ``cpus`` (threads started later inherit it from their creator; an
    affinity set with pid 0 would bind the calling thread only). Returns the calling thread's cores before, to
    bind back to."""
    before = frozenset(os.sched_getaffinity(0))
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:        # a thread that has just exited
            pass
    return before
