"""What a CPU benchmark ran on, and how busy the machine was: figures mean little without both."""
from __future__ import annotations

import os
import platform
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
    """1-minute load average. Another busy process on a core slows torch's OpenMP threads many times over (they
    wait for each other), so a figure is only as good as the load it was measured under."""
    return os.getloadavg()[0]
