"""What one rank holds in memory: its parameters, its KV cache and the process's resident set."""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RankMemory:
    rank: int
    parameter_bytes: int    # the rank's weights (its share; norms and replicated KV groups in full)
    kv_cache_bytes: int     # K and V of all layers
    rss_bytes: int          # resident set of the rank's process now (torch itself included)
    peak_rss_bytes: int     # the most it has been, loading included


def measure_rank_memory(rank: int, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
                        ) -> RankMemory:
    rss = resident_bytes()
    return RankMemory(rank=rank,
                      parameter_bytes=model.weight_bytes(),
                      kv_cache_bytes=sum(t.numel() * t.element_size() for pair in kv_caches for t in pair),
                      # the kernel updates the high-water mark lazily: it can lag the current count a little
                      rss_bytes=rss, peak_rss_bytes=max(rss, peak_resident_bytes()))


def resident_bytes() -> int:
    """The process's current resident set (Linux); the peak where /proc is missing."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_resident_bytes()


def peak_resident_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024     # ru_maxrss is in KiB on Linux
