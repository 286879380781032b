"""Length ranges of synthetic workloads, shared by the offline and the serving benchmarks."""
from __future__ import annotations

import argparse
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class IntRange:
    """An inclusive integer range, written ``LOW:HIGH`` (or ``N`` for one value) on the command line (an
    argparse ``type``). Torch-free: the serving harness runs on client machines that need only grpc."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> "IntRange":
        low, _, high = text.partition(":")
        try:
            result = cls(int(low), int(high or low))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected LOW:HIGH or N, got {text!r}") from None
        if not 1 <= result.low <= result.high:
            raise argparse.ArgumentTypeError(f"expected 1 <= LOW <= HIGH, got {text!r}")
        return result

    def draw(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return f"{self.low}:{self.high}"
