"""The check after a chaos run (see ``chaos_plan`` for the misbehaving requests): the server must still be SERVING,
with nothing running, nothing waiting and every KV block free."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from glmserve.bench.serve.backend import SERVING, Backend, Load
from glmserve.bench.serve.chaos_plan import (CHAOS_OUTPUT_LEN, DEADLINE_RANGE_S, INVALID_SAMPLING, KINDS,  # noqa: F401
                                             Chaos, plan_chaos, status_counts)


@dataclass
class HealthCheck:
    """The server's state after a chaos run."""

    serving: str                 # grpc.health.v1 status name, or the error that prevented the check
    load: Load | None
    settle_s: float              # how long it took to go idle (or how long we waited)

    @property
    def ok(self) -> bool:
        return self.serving == SERVING and self.load is not None and is_idle(self.load)


def is_idle(load: Load) -> bool:
    return load.num_running == 0 and load.num_waiting == 0 and load.num_free_blocks == load.num_total_blocks


async def check_idle(backend: Backend, settle_s: float) -> HealthCheck:
    """Health and load once the server had up to ``settle_s`` seconds to finish aborting what was cancelled.
    ``backend``: a backend, or a gRPC client (its health and load calls are the same)."""
    start = time.perf_counter()
    load = None
    try:
        serving = await backend.health()
        while True:
            load = await backend.load()
            if load is None or is_idle(load) or time.perf_counter() - start > settle_s:
                break
            await asyncio.sleep(0.05)
        serving = await backend.health()   # again: it must still serve after the aborts settled
    except Exception as exc:  # noqa: BLE001 - any failure to answer is the finding
        serving = f"unreachable ({type(exc).__name__}: {exc})"
    return HealthCheck(serving, load, time.perf_counter() - start)


@dataclass
class ChaosReport:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)   # kind -> status code -> requests
    health: HealthCheck | None = None

    @property
    def total(self) -> int:
        return sum(sum(codes.values()) for codes in self.counts.values())
