"""Freezing the start-up heap: full collections stop walking it, and what is made later is still collected."""
from __future__ import annotations

import gc
import weakref

import torch  # noqa: F401 - the heap a frontend or an engine core has after start-up

from glmserve.engine.runtime.startup_heap import freeze_startup_heap, unfreeze_heap


class _Node:
    pass


def test_the_startup_heap_leaves_the_collector_and_later_garbage_is_still_collected():
    tracked = len(gc.get_objects())           # what a full collection walks
    assert tracked > 10_000
    freeze_startup_heap()
    try:
        assert gc.get_freeze_count() > tracked // 2
        assert len(gc.get_objects()) < tracked // 10
        cycle = _Node()
        cycle.self = cycle                     # garbage only the cyclic collector can free
        ref = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert ref() is None
    finally:
        unfreeze_heap()
    assert gc.get_freeze_count() == 0 and len(gc.get_objects()) >= tracked // 2
