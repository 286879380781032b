"""What the server saw during a run: counters from its Prometheus page before and after, peaks from load samples.

Counters (preemptions, prefix-cache queries and hits) are cumulative, so the run's share is after minus before;
the prefix-cache hit rate over the run is hits over queries of that share. Gauges read at two instants miss the
peak, so a poller samples the load while the run is going (gRPC: GetLoad every 0.05 s; HTTP backends: the
Prometheus gauges, every 0.25 s): a peak is the highest *sample*, so a burst shorter than the poll interval can
be missed (a short run of small requests may report 0 running).
"""
from __future__ import annotations

import asyncio
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from glmserve.bench.serve.backend import Backend, Load

# Sample names on the /metrics page (counters carry the _total suffix).
KV_USAGE = "glmserve_kv_cache_usage_ratio"
PREEMPTIONS = "glmserve_num_preemptions_total"
PREFIX_QUERIES = "glmserve_prefix_cache_queries_total"
PREFIX_HITS = "glmserve_prefix_cache_hits_total"
# The load gauges, by the names glmserve and vLLM give them (the first found wins).
RUNNING = ("glmserve_num_requests_running", "vllm:num_requests_running")
WAITING = ("glmserve_num_requests_waiting", "vllm:num_requests_waiting")
KV_USAGES = (KV_USAGE, "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
CACHE_INFO = (("glmserve_cache_config_info", "num_kv_blocks"), ("vllm:cache_config_info", "num_gpu_blocks"))


@dataclass(frozen=True)
class Counters:
    kv_cache_usage: float
    num_preemptions: float
    prefix_cache_queries: float
    prefix_cache_hits: float


@dataclass
class Peaks:
    kv_cache_usage: float = 0.0
    num_running: int = 0
    num_waiting: int = 0


@dataclass
class ServerFigures:
    """The server's side of one run."""

    kv_cache_usage_peak: float
    num_requests_running_peak: int
    num_requests_waiting_peak: int
    # From /metrics (None when no --metrics-url was given):
    kv_cache_usage_end: float | None = None
    num_preemptions: int | None = None
    prefix_cache_queries: int | None = None
    prefix_cache_hits: int | None = None
    prefix_cache_hit_rate: float | None = None   # None also when no prompt token was looked up


def parse_counters(text: str) -> Counters:
    """The run-relevant samples of a Prometheus text page (a missing one reads as 0)."""
    values = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
              if not s.labels}
    return Counters(*(values.get(name, 0.0) for name in (KV_USAGE, PREEMPTIONS, PREFIX_QUERIES, PREFIX_HITS)))


def scrape(url: str, timeout: float = 10.0) -> Counters:
    return parse_counters(fetch(url, timeout))


def fetch(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read().decode("utf-8")


def parse_load(text: str) -> Load | None:
    """The load as the gauges of a Prometheus page tell it (None if the page has no running/waiting gauges).
    Blocks: the cache info metric's total, and its share not in use."""
    values, total = {}, 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values.setdefault(sample.name, sample.value)
            for name, label in CACHE_INFO:
                if sample.name == name and label in sample.labels:
                    total = int(sample.labels[label])

    def first(names: tuple[str, ...]) -> float | None:
        return next((values[n] for n in names if n in values), None)
    running, waiting, usage = first(RUNNING), first(WAITING), first(KV_USAGES)
    if running is None or waiting is None:
        return None
    usage = usage or 0.0
    return Load(int(running), int(waiting), usage, total - round(usage * total), total)


def figures(peaks: Peaks, before: Counters | None, after: Counters | None) -> ServerFigures:
    result = ServerFigures(peaks.kv_cache_usage, peaks.num_running, peaks.num_waiting)
    if before is not None and after is not None:
        queries = round(after.prefix_cache_queries - before.prefix_cache_queries)
        hits = round(after.prefix_cache_hits - before.prefix_cache_hits)
        result.kv_cache_usage_end = after.kv_cache_usage
        result.num_preemptions = round(after.num_preemptions - before.num_preemptions)
        result.prefix_cache_queries, result.prefix_cache_hits = queries, hits
        result.prefix_cache_hit_rate = hits / queries if queries else None
    return result


async def poll_peaks(backend: Backend, peaks: Peaks, interval: float | None = None) -> None:
    """Fold load samples (GetLoad, or the metrics page) into ``peaks`` until cancelled. ``backend``: a backend,
    or a gRPC client (whose load call is the same)."""
    interval = getattr(backend, "poll_interval_s", 0.05) if interval is None else interval
    while True:
        try:
            load = await backend.load()
        except Exception:  # noqa: BLE001 - a missed sample only lowers the peak's resolution; the run goes on
            await asyncio.sleep(interval)
            continue
        if load is None:   # this backend cannot see the load
            return
        peaks.kv_cache_usage = max(peaks.kv_cache_usage, load.kv_cache_usage)
        peaks.num_running = max(peaks.num_running, load.num_running)
        peaks.num_waiting = max(peaks.num_waiting, load.num_waiting)
        await asyncio.sleep(interval)
