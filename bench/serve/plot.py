"""Latency percentiles against load: one panel per latency, median / p90 / p99 over the runs of a sweep.

The x axis is the achieved request throughput rather than the offered rate: an infinite rate has no place on a
rate axis, and past saturation the two part ways, which is what the plot is for. Each point is labelled with its
offered rate.
"""
from __future__ import annotations

import math

from glmserve.bench.serve.report import LATENCIES, RunResult
from glmserve.bench.common.output import output_path

PERCENTILES = (("median", "p50"), ("p90", "p90"), ("p99", "p99"))


def plot_latencies(results: list[RunResult], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")   # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    xs = [r.metrics.request_throughput for r in results]
    for ax, name in zip(axes.flat, LATENCIES):
        for attr, label in PERCENTILES:
            ax.plot(xs, [getattr(getattr(r.metrics, name), attr) for r in results], marker="o", label=label)
        for x, r in zip(xs, results):
            offered = "inf" if math.isinf(r.request_rate) else f"{r.request_rate:g}"
            ax.annotate(offered, (x, getattr(r.metrics, name).p99), textcoords="offset points", xytext=(0, 5),
                        fontsize=7, ha="center")
        ax.set_title(f"{name.upper()} (ms)")
        ax.set_xlabel("achieved request throughput (req/s); labels: offered rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    dataset = results[0].dataset if results else ""
    fig.suptitle(f"glmserve latency vs load ({dataset})")
    fig.savefig(output_path(path), dpi=120)
    plt.close(fig)
