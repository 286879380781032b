"""Serving metrics from request records: pure functions, no clock and no network.

Per completed request (status OK, no chaos):
  TTFT  time to first token: the call to the first chunk that carried a token
  TPOT  time per output token after the first: (E2EL - TTFT) / (output tokens - 1); only requests with 2+ tokens
  ITL   inter-token latency: the gap between consecutive token-carrying chunks, one sample per gap, pooled over
        all requests (a chunk that carries several tokens is one gap: that is when the client saw them)
  E2EL  end-to-end latency: the call to its end
Each is summarised as mean, median, population std, p90 and p99 (linear interpolation), in milliseconds.
Goodput counts the completed requests that meet every given SLO, per second of the run (None without SLOs).
"""
from __future__ import annotations

import argparse
import math
from collections import Counter
from dataclasses import dataclass, field

from glmserve.bench.serve.client import RequestRecord

SLO_NAMES = ("ttft", "tpot", "e2el")


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds; all zero when there is no sample."""

    mean: float = 0.0
    median: float = 0.0
    std: float = 0.0
    p90: float = 0.0
    p99: float = 0.0
    count: int = 0


@dataclass
class BenchMetrics:
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    duration: float
    request_throughput: float
    request_goodput: float | None   # None without SLOs
    output_throughput: float
    total_token_throughput: float
    ttft: LatencyStats
    tpot: LatencyStats
    itl: LatencyStats
    e2el: LatencyStats
    errors: dict[str, int] = field(default_factory=dict)   # status code -> failed requests


def percentile(sorted_values: list[float], p: float) -> float:
    """The ``p``-th percentile (0..100) of ascending values, interpolating linearly between neighbours."""
    if not sorted_values:
        return 0.0
    rank = (len(sorted_values) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def latency_stats(seconds: list[float]) -> LatencyStats:
    if not seconds:
        return LatencyStats()
    ms = sorted(s * 1000 for s in seconds)
    mean = sum(ms) / len(ms)
    std = math.sqrt(sum((v - mean) ** 2 for v in ms) / len(ms))
    return LatencyStats(mean, percentile(ms, 50), std, percentile(ms, 90), percentile(ms, 99), len(ms))


def ttft(record: RequestRecord) -> float:
    return record.chunk_times[0] - record.start


def e2el(record: RequestRecord) -> float:
    return record.end - record.start


def tpot(record: RequestRecord) -> float | None:
    tokens = record.output_len
    return (e2el(record) - ttft(record)) / (tokens - 1) if tokens > 1 else None


def itls(record: RequestRecord) -> list[float]:
    times = record.chunk_times
    return [b - a for a, b in zip(times, times[1:])]


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """Whether a completed request meets every SLO given (a request without a TPOT meets a TPOT SLO)."""
    values = {"ttft": ttft(record), "tpot": tpot(record) or 0.0, "e2el": e2el(record)}
    return all(values[name] * 1000 <= limit for name, limit in slos_ms.items())


def compute_metrics(records: list[RequestRecord], duration: float, slos_ms: dict[str, float]) -> BenchMetrics:
    """Figures over the well-behaved requests; chaos requests are reported on their own (see serve_chaos).

    A request counts as completed when its call ended OK with at least one token.
    """
    normal = [r for r in records if r.chaos is None]
    done = [r for r in normal if r.ok and r.chunk_times]
    # An OK call without a token cannot happen with max_tokens >= 1; it is counted rather than dropped silently.
    errors = Counter(r.code if not r.ok else "NO_TOKENS" for r in normal if not (r.ok and r.chunk_times))
    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_len for r in done)

    def per_s(n: int) -> float:
        return n / duration if duration > 0 else 0.0

    return BenchMetrics(
        completed=len(done), failed=len(normal) - len(done), total_input_tokens=input_tokens,
        total_output_tokens=output_tokens, duration=duration, request_throughput=per_s(len(done)),
        request_goodput=per_s(sum(meets_slos(r, slos_ms) for r in done)) if slos_ms else None,
        output_throughput=per_s(output_tokens),
        total_token_throughput=per_s(input_tokens + output_tokens),
        ttft=latency_stats([ttft(r) for r in done]),
        tpot=latency_stats([t for t in map(tpot, done) if t is not None]),
        itl=latency_stats([gap for r in done for gap in itls(r)]),
        e2el=latency_stats([e2el(r) for r in done]),
        errors=dict(sorted(errors.items())))


def parse_slo(text: str) -> tuple[str, float]:
    """``"ttft:500"`` -> ("ttft", 500.0) milliseconds. An argparse ``type``."""
    name, _, value = text.partition(":")
    try:
        limit = float(value)
    except ValueError:
        limit = math.nan
    if name not in SLO_NAMES or not limit > 0:
        raise argparse.ArgumentTypeError(f"expected NAME:MS with NAME one of {', '.join(SLO_NAMES)} and MS > 0, "
                                         f"got {text!r}")
    return name, limit
