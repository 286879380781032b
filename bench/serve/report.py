"""A run's result and its renderings: the console table, the JSON object (vLLM's key names), a CSV row."""
from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass

from glmserve.bench.serve.chaos import ChaosReport
from glmserve.bench.serve.metrics import BenchMetrics, LatencyStats
from glmserve.bench.serve.server_stats import ServerFigures

LATENCIES = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "median", "std", "p90", "p99")


@dataclass
class RunResult:
    model: str
    dataset: str
    num_prompts: int              # well-behaved requests sent (chaos requests are counted in `chaos`)
    request_rate: float           # offered; inf: all at once
    burstiness: float
    max_concurrency: int | None
    slos_ms: dict[str, float]
    metrics: BenchMetrics
    server: ServerFigures
    chaos: ChaosReport | None = None
    backend: str = "grpc"         # how the requests were sent (--backend)
    load_source: str | None = "GetLoad"   # where the load peaks come from; None: nowhere (no peaks)

    @property
    def passed(self) -> bool:
        """Every well-behaved request completed, and a chaos run left the server healthy and idle."""
        chaos_ok = self.chaos is None or (self.chaos.health is not None and self.chaos.health.ok)
        return self.metrics.completed == self.num_prompts and chaos_ok


def _rate(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate   # JSON has no infinity


def result_json(result: RunResult) -> dict:
    m = result.metrics
    out = {
        "backend": result.backend, "model": result.model, "dataset": result.dataset, "num_prompts": result.num_prompts,
        "request_rate": _rate(result.request_rate), "burstiness": result.burstiness,
        "max_concurrency": result.max_concurrency,
        "completed": m.completed, "failed": m.failed, "duration": m.duration,
        "total_input_tokens": m.total_input_tokens, "total_output_tokens": m.total_output_tokens,
        "request_throughput": m.request_throughput, "request_goodput": m.request_goodput,
        "output_throughput": m.output_throughput, "total_token_throughput": m.total_token_throughput,
    }
    for name in LATENCIES:
        stats: LatencyStats = getattr(m, name)
        out.update({f"{stat}_{name}_ms": getattr(stats, stat) for stat in STATS})
    out["goodput_slos_ms"] = result.slos_ms
    out["errors"] = m.errors
    out["server"] = dataclasses.asdict(result.server)
    if result.load_source is None:   # nothing was sampled: no peak to report
        out["server"].update(kv_cache_usage_peak=None, num_requests_running_peak=None, num_requests_waiting_peak=None)
    if result.chaos is not None:
        health = result.chaos.health
        out["chaos"] = {
            "requests": result.chaos.total, "status_by_kind": result.chaos.counts,
            "server_ok": health is not None and health.ok,
            "health": None if health is None else health.serving,
            "load": None if health is None or health.load is None else dataclasses.asdict(health.load),
            "settle_s": None if health is None else health.settle_s,
        }
    return out


def csv_text(results: list[RunResult]) -> str:
    """One row per run: the JSON's scalar fields, then ``errors_<CODE>`` and ``server_<name>`` columns."""
    rows = []
    for result in results:
        data = result_json(result)
        row = {k: v for k, v in data.items() if not isinstance(v, dict)}
        row.update({f"errors_{code}": n for code, n in data["errors"].items()})
        row.update({f"server_{k}": v for k, v in data["server"].items()})
        if "chaos" in data:
            row["chaos_requests"], row["chaos_server_ok"] = data["chaos"]["requests"], data["chaos"]["server_ok"]
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))   # union, in first-seen order
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


# ---- console ----------------------------------------------------------------------------------------------------
def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def run_table(result: RunResult) -> str:
    m, s = result.metrics, result.server
    rate = "inf" if math.isinf(result.request_rate) else f"{result.request_rate:g}"
    over = "" if result.backend == "grpc" else f" ({result.backend})"
    lines = [f"{' ' + result.dataset + ' @ ' + rate + ' req/s' + over + ' ':=^64}"]

    def row(label: str, value) -> None:
        lines.append(f"{label:<44}{_fmt(value):>20}")

    row("Requests completed / sent", f"{m.completed} / {result.num_prompts}")
    row("Failed requests", m.failed)
    if m.errors:
        row("  by status code", ", ".join(f"{code} {n}" for code, n in m.errors.items()))
    row("Duration (s)", m.duration)
    row("Total input tokens", m.total_input_tokens)
    row("Total output tokens", m.total_output_tokens)
    row("Request throughput (req/s)", m.request_throughput)
    if m.request_goodput is not None:
        row("Request goodput (req/s)", m.request_goodput)
        row("  SLOs", " ".join(f"{k}<={v:g}ms" for k, v in result.slos_ms.items()))
    row("Output token throughput (tok/s)", m.output_throughput)
    row("Total token throughput (tok/s)", m.total_token_throughput)
    lines.append(f"{' Latency (ms) ':-^64}")
    lines.append(f"{'':<8}" + "".join(f"{stat:>11}" for stat in STATS))
    for name in LATENCIES:
        stats: LatencyStats = getattr(m, name)
        lines.append(f"{name.upper():<8}" + "".join(f"{getattr(stats, stat):>11.2f}" for stat in STATS))
    lines.append(f"{' Server ':-^64}")
    if result.load_source is None:
        row("KV cache usage, peak", "n/a (no --metrics-url)")
        row("Requests running / waiting, peak", "n/a")
    else:
        row(f"KV cache usage, peak ({result.load_source})", f"{s.kv_cache_usage_peak:.1%}")
        row("Requests running / waiting, peak", f"{s.num_requests_running_peak} / {s.num_requests_waiting_peak}")
    if s.num_preemptions is not None:
        row("KV cache usage at the end", f"{s.kv_cache_usage_end:.1%}")
        row("Preemptions", s.num_preemptions)
        hit_rate = "n/a" if s.prefix_cache_hit_rate is None else f"{s.prefix_cache_hit_rate:.1%}"
        row("Prefix cache hit rate (tokens)", f"{hit_rate} of {s.prefix_cache_queries}")
    if result.chaos is not None:
        lines += chaos_lines(result.chaos)
    lines.append("=" * 64)
    return "\n".join(lines)


def chaos_lines(report: ChaosReport) -> list[str]:
    lines = [f"{' Chaos: ' + str(report.total) + ' requests ':-^64}"]
    for kind, codes in report.counts.items():
        lines.append(f"{kind:<12}" + ", ".join(f"{code} {n}" for code, n in codes.items()))
    health = report.health
    if health is not None:
        load = health.load
        state = ("no load reported" if load is None else
                 f"running {load.num_running}, waiting {load.num_waiting}, "
                 f"free blocks {load.num_free_blocks}/{load.num_total_blocks}")
        verdict = "OK" if health.ok else "FAILED"
        lines.append(f"after {health.settle_s:.2f}s: {health.serving}; {state} -> {verdict}")
    return lines


def sweep_table(results: list[RunResult]) -> str:
    """One line per rate: the figures that show where the server saturates."""
    header = (f"{'rate':>6} {'req/s':>7} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} "
              f"{'TPOT p99':>9} {'E2EL p99':>9} {'goodput':>8}")
    lines = [header, "-" * len(header)]
    for r in results:
        m = r.metrics
        rate = "inf" if math.isinf(r.request_rate) else f"{r.request_rate:g}"
        lines.append(f"{rate:>6} {m.request_throughput:>7.2f} {m.output_throughput:>10.1f} {m.ttft.median:>9.1f} "
                     f"{m.ttft.p99:>9.1f} {m.tpot.median:>9.1f} {m.tpot.p99:>9.1f} {m.e2el.p99:>9.1f} "
                     f"{_fmt(m.request_goodput):>8}")
    return "\n".join(lines)
