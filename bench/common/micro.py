"""What the CPU micro-benchmarks (cpu-linear, cpu-attention) share: timing one call, and the JSON they write."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any, Callable

import torch

from glmserve.bench.common.machine import cpu_model_name
from glmserve.bench.common.output import output_path


def time_ms(fn: Callable[[], Any], iterations: int) -> float:
    """Milliseconds per call of ``fn``, after three warm-up calls."""
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations * 1e3


def write_points(path: str, points: list) -> None:
    """The measured points (dataclasses) with the CPU, thread count and torch version they were measured on."""
    with open(output_path(path), "w", encoding="utf-8") as f:
        json.dump({"cpu": cpu_model_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "points": [asdict(p) for p in points]}, f, indent=2)
