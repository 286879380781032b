"""What the server saw during a run: counters from its Prometheus page before and after, peaks from GetLoad.

Counters (preemptions, prefix-cache queries and hits) are cumulative, so the run's share is after minus before;
the prefix-cache hit rate over the run is hits over queries of that share. Gauges read at two instants miss the
peak, so a poller samples GetLoad while the run is going: a peak is the highest *sample*, so a burst shorter than
the poll interval can be missed (a short run of small requests may report 0 running).
"""
from __future__ import annotations

import asyncio
import urllib.request
from dataclasses import dataclass

import grpc
from prometheus_client.parser import text_string_to_metric_families

from glmserve.engine.entrypoints.grpc.client import AsyncGenerationClient

# Sample names on the /metrics page (counters carry the _total suffix).
KV_USAGE = "glmserve_kv_cache_usage_ratio"
PREEMPTIONS = "glmserve_num_preemptions_total"
PREFIX_QUERIES = "glmserve_prefix_cache_queries_total"
PREFIX_HITS = "glmserve_prefix_cache_hits_total"
POLL_INTERVAL_S = 0.05   # a loopback GetLoad costs well under a millisecond of server time


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
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse_counters(response.read().decode("utf-8"))


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


async def poll_peaks(client: AsyncGenerationClient, peaks: Peaks, interval: float = POLL_INTERVAL_S) -> None:
    """Fold GetLoad samples into ``peaks`` until cancelled."""
    while True:
        try:
            load = await client.load(timeout=5)
        except grpc.RpcError:   # a missed sample only lowers the peak's resolution; the run goes on
            await asyncio.sleep(interval)
            continue
        peaks.kv_cache_usage = max(peaks.kv_cache_usage, load.kv_cache_usage)
        peaks.num_running = max(peaks.num_running, load.num_running)
        peaks.num_waiting = max(peaks.num_waiting, load.num_waiting)
        await asyncio.sleep(interval)
