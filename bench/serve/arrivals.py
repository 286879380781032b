"""When each request of a run is sent: a Poisson process, or a burstier or smoother gamma process.

Gaps between arrivals are gamma-distributed with shape ``burstiness`` and mean ``1 / rate``. Shape 1 is the
exponential distribution, so arrivals form a Poisson process; below 1 they come in bursts (the gaps' coefficient
of variation is ``1 / sqrt(burstiness)``), above 1 they are more regular. An infinite rate sends everything at once.
"""
from __future__ import annotations

import argparse
import math
import random


def arrival_offsets(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds after the start at which each of ``num`` requests is sent; the first goes at 0."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be > 0, got {rate} and {burstiness}")
    if math.isinf(rate):
        return [0.0] * num
    rng = random.Random(seed)
    scale = 1.0 / (rate * burstiness)   # mean gap = shape * scale = 1 / rate
    offsets, t = [], 0.0
    for _ in range(num):
        offsets.append(t)
        t += rng.gammavariate(burstiness, scale)
    return offsets


def parse_rates(text: str) -> list[float]:
    """``"inf"`` or ``"2,4,8"`` (a sweep, run in the given order). An argparse ``type``."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates (or inf), got {text!r}") from None
    if not rates or any(not r > 0 for r in rates):   # `not r > 0` also refuses nan
        raise argparse.ArgumentTypeError(f"request rates must be > 0 (or inf), got {text!r}")
    return rates
