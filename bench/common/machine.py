"""What a CPU benchmark ran on, and how busy the machine was: figures mean little without both."""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass

import torch


@dataclass
class MachineInfo:
    cpu_model: str
    num_cpus: int
    torch_threads: int
    torch_version: str
    transformers_version: str | None


def cpu_model_name() -> str:
    """``lscpu``'s "Model name" (from /proc/cpuinfo), or whatever the platform reports elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> MachineInfo:
    try:
        import transformers
        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = None
    return MachineInfo(cpu_model_name(), os.cpu_count() or 1, torch.get_num_threads(), torch.__version__,
                       transformers_version)


def load_average() -> float:
    """1-minute load average (it counts the benchmark's own running threads too)."""
    return os.getloadavg()[0]


@dataclass
class CpuSnapshot:
    wall: float
    all_busy: float | None      # busy CPU seconds of all processes since boot (/proc/stat); None off Linux
    own: float                  # CPU seconds of this process, all threads


def cpu_snapshot() -> CpuSnapshot:
    own = os.times()
    return CpuSnapshot(time.perf_counter(), _all_busy_seconds(), own.user + own.system)


def others_cpu_share(start: CpuSnapshot, end: CpuSnapshot) -> float | None:
    """The share of all cores' time that other processes used between two snapshots: 0 means the machine was ours.

    Worth recording with every CPU figure: another busy process on a core slows torch's OpenMP threads many times
    over (they wait for each other at every parallel region), far more than its share of the CPU suggests.
    """
    if start.all_busy is None or end.all_busy is None:
        return None
    others = (end.all_busy - start.all_busy) - (end.own - start.own)
    capacity = (end.wall - start.wall) * (os.cpu_count() or 1)
    return min(1.0, max(0.0, others / capacity)) if capacity > 0 else None


def _all_busy_seconds() -> float | None:
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait are busy.
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")
