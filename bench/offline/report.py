"""The offline benchmark's result: typed records, the comparisons between them, a text summary and JSON."""
from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from typing import Sequence

from glmserve.bench.common.machine import MachineInfo
from glmserve.bench.common.output import output_path


@dataclass
class SystemResult:
    name: str
    num_requests: int           # requests this system ran (a subset of the workload when ``subset``)
    num_output_tokens: int      # useful tokens only: each request's own output length
    seconds: float
    others_cpu_share: float | None  # share of the cores other processes used during this run (0: undisturbed)
    load_average: float         # 1-minute load average right after this run, the benchmark's own threads included
    subset: bool = False        # tokens/s measured on the first ``num_requests`` requests only

    @property
    def tokens_per_s(self) -> float:
        return self.num_output_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Mismatch:
    request: int                # index in the workload
    position: int               # first output position where the two differ (the shorter length if a prefix)


@dataclass
class Agreement:
    """Greedy outputs of glmserve against a baseline on the requests both ran."""

    baseline: str
    compared: int
    agree: int
    mismatches: list[Mismatch] = field(default_factory=list)


@dataclass
class EngineOverhead:
    """glmserve's run split into model work (forward + logits, on the batch shapes it ran) and everything else."""

    total_seconds: float
    forward_seconds: float
    logits_seconds: float
    num_output_tokens: int
    num_steps: int
    num_forward_tokens: int     # tokens in the forward batches: prompt chunks and decodes
    num_preemptions: int

    @property
    def model_seconds(self) -> float:
        return self.forward_seconds + self.logits_seconds

    @property
    def overhead(self) -> float:
        return 1.0 - self.model_seconds / self.total_seconds

    @property
    def model_only_tokens_per_s(self) -> float:
        """Output tokens/s if the engine cost nothing beyond the model's forward passes."""
        return self.num_output_tokens / self.model_seconds


@dataclass
class OfflineResult:
    settings: dict              # the command's arguments
    machine: MachineInfo
    glmserve: SystemResult
    overhead: EngineOverhead
    hf_static: SystemResult | None = None
    hf_single: SystemResult | None = None
    agreement: list[Agreement] = field(default_factory=list)

    def ratios(self) -> dict[str, float]:
        out = {}
        for key, base in (("vs_hf_static", self.hf_static), ("vs_hf_single", self.hf_single)):
            if base is not None and base.tokens_per_s > 0:
                out[key] = self.glmserve.tokens_per_s / base.tokens_per_s
        return out

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        for key in ("glmserve", "hf_static", "hf_single"):
            system = getattr(self, key)
            if system is not None:
                out[key]["tokens_per_s"] = system.tokens_per_s
        out["overhead"]["overhead"] = self.overhead.overhead
        out["overhead"]["model_only_tokens_per_s"] = self.overhead.model_only_tokens_per_s
        out["ratios"] = self.ratios()
        return out

    def summary(self) -> str:
        w = self.settings
        lines = [f"offline: {w['model']}, {w['num_requests']} requests, input {w['input_len']}, output "
                 f"{w['output_len']}, batch {w['max_num_seqs']}, greedy {w.get('dtype', 'float32')}, "
                 f"{self.machine.torch_threads} threads on {self.machine.cpu_model}",
                 f"{'system':<34}{'requests':>10}{'out tokens':>12}{'seconds':>10}{'tokens/s':>10}"
                 f"{'others':>8}{'load':>6}"]
        lines += [_system_line(s, w["num_requests"]) for s in (self.glmserve, self.hf_static, self.hf_single)
                  if s is not None]
        if self.hf_single is not None and self.hf_single.subset:
            full = self.glmserve.num_output_tokens / self.hf_single.tokens_per_s
            lines.append(f"  * measured on the first {self.hf_single.num_requests} requests only; at that rate all "
                         f"{w['num_requests']} would take {full:.0f} s")
        ratios = self.ratios()
        for key, label in (("vs_hf_static", "HF static batching"), ("vs_hf_single", "HF one at a time")):
            if key in ratios:
                lines.append(f"glmserve / {label}: {ratios[key]:.2f}x")
        o = self.overhead
        lines.append(f"engine overhead: {100 * o.overhead:.1f}% (model forward {o.forward_seconds:.2f} s + logits "
                     f"{o.logits_seconds:.2f} s of {o.total_seconds:.2f} s; model only: "
                     f"{o.model_only_tokens_per_s:.1f} tokens/s; {o.num_steps} steps, {o.num_forward_tokens} tokens "
                     f"forwarded, {o.num_preemptions} preemptions)")
        for a in self.agreement:
            lines.append(f"greedy outputs equal to {a.baseline}: {a.agree}/{a.compared}"
                         + (f"; first mismatches (request, position): "
                            f"{[(m.request, m.position) for m in a.mismatches[:8]]}" if a.mismatches else ""))
        if self.agreement and w.get("dtype", "float32") != "float32":
            lines.append("  (bfloat16: the two implementations round differently, so greedy outputs part where two "
                         "logits are close; float32 is the correctness comparison)")
        return "\n".join(lines)


def _system_line(s: SystemResult, total_requests: int) -> str:
    requests = f"{s.num_requests}/{total_requests}*" if s.subset else str(s.num_requests)
    others = "n/a" if s.others_cpu_share is None else f"{100 * s.others_cpu_share:.0f}%"
    return (f"{s.name:<34}{requests:>10}{s.num_output_tokens:>12}{s.seconds:>10.2f}{s.tokens_per_s:>10.1f}"
            f"{others:>8}{s.load_average:>6.2f}")


def compare_outputs(baseline: str, ours: Sequence[Sequence[int]], theirs: Sequence[Sequence[int]]) -> Agreement:
    """``ours[i]`` and ``theirs[i]`` are the outputs of workload request i (``theirs`` may cover a prefix)."""
    mismatches = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if list(a) != list(b):
            position = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            mismatches.append(Mismatch(i, position))
    compared = min(len(ours), len(theirs))
    return Agreement(baseline, compared, compared - len(mismatches), mismatches)


def median_ratios(results: Sequence[OfflineResult]) -> dict[str, float]:
    """Per-baseline median of the rounds' ratios: each round's systems ran minutes apart, the rounds longer."""
    keys = {key for r in results for key in r.ratios()}
    return {key: statistics.median(r.ratios()[key] for r in results if key in r.ratios()) for key in sorted(keys)}


def median_ratios_line(results: Sequence[OfflineResult]) -> str:
    parts = [f"{key.removeprefix('vs_')}: {value:.2f}x" for key, value in median_ratios(results).items()]
    per_round = [", ".join(f"{v:.2f}" for v in r.ratios().values()) for r in results]
    return f"median over {len(results)} rounds: " + "; ".join(parts) + f" (per round: {' | '.join(per_round)})"


def write_results(path: str, results: Sequence[OfflineResult]) -> None:
    """One round: that round's JSON. Several: ``{"rounds": [...], "median_ratios": {...}}``."""
    data = results[0].to_json() if len(results) == 1 else {
        "rounds": [r.to_json() for r in results], "median_ratios": median_ratios(results)}
    with open(output_path(path), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
