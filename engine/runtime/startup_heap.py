"""Keep the start-up heap out of Python's garbage collector.

A process that has imported torch and loaded a model tracks a quarter of a million objects or more (modules,
tensors' Python wrappers, imported code), none of which will ever be garbage. Every full (generation 2) collection
walks them all, stalling every stream of the process at once (``glmserve-bench startup-heap`` measures it: on the
2-core CPU with glm-tiny, 120 ms a collection, and engine steps of 130 ms among steps of 13). ``gc.freeze()``
moves them to a permanent generation the collector skips, as vLLM does after start-up; objects made later are
collected as before.
"""
from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Once start-up is over: collect what start-up left behind, then freeze everything still alive."""
    gc.collect()
    gc.freeze()


def unfreeze_heap() -> None:
    """For a caller that freezes only for a while (a benchmark inside a larger program, the tests)."""
    gc.unfreeze()
