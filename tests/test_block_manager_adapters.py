"""BlockManager with fine-tunes: pinned P-tuning prefix runs shared by reference count, never evicted while loaded;
prefix-cache keys salted by the adapter; block accounting after a prefix that ends inside a block."""
from __future__ import annotations

import pytest

from glmserve.engine.core.adapters import AdapterBinding, AdapterKind
from glmserve.engine.core.block_manager import BlockManager
from glmserve.engine.core.request import Request
from glmserve.engine.core.sampling_params import SamplingParams


def _req(rid: str, tokens: list[int], adapter: AdapterBinding | None = None) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), adapter=adapter)


def _admit(bm: BlockManager, req: Request) -> int:
    cached = bm.find_cached_prefix(req)
    num_cached = bm.cached_tokens(req, cached)
    assert bm.allocate(req, req.num_tokens - num_cached, cached)
    req.num_computed_tokens = req.num_tokens
    return num_cached


def _lora(name: str) -> AdapterBinding:
    return AdapterBinding(name, AdapterKind.LORA, cache_salt=name.encode())


def test_pinned_prefix_is_shared_by_reference_and_survives_its_requests():
    bm = BlockManager(num_blocks=10, block_size=4)
    prefix = bm.pin_prefix(10)                       # 2 full blocks + 2 tail slots in a third, source-only block
    assert len(prefix.block_ids) == 3 and prefix.shared_block_ids == prefix.block_ids[:2] and prefix.tail == 2
    binding = AdapterBinding("p", AdapterKind.PTUNING, b"p", prefix)
    a, b = _req("a", list(range(7)), binding), _req("b", list(range(50, 57)), binding)
    _admit(bm, a)
    _admit(bm, b)
    # Each: the 2 shared blocks, then ceil((2 + 7) / 4) = 3 own blocks (tail slots first).
    for req in (a, b):
        assert bm.block_ids(req)[:2] == list(prefix.shared_block_ids)
        assert len(bm.block_ids(req)) == 5
    assert [bm.blocks[i].ref_count for i in prefix.block_ids] == [3, 3, 1]
    bm.check_invariants()
    bm.free(a)
    bm.free(b)
    assert [bm.blocks[i].ref_count for i in prefix.block_ids] == [1, 1, 1]
    assert bm.num_free_blocks == 7
    bm.check_invariants()
    bm.unpin_prefix(prefix)
    assert bm.num_free_blocks == 10
    bm.check_invariants()


def test_pinned_blocks_are_never_handed_out_under_memory_pressure():
    bm = BlockManager(num_blocks=6, block_size=4)
    prefix = bm.pin_prefix(8)
    other = _req("x", list(range(16)))               # takes the 4 blocks left
    _admit(bm, other)
    assert bm.num_free_blocks == 0
    assert not set(bm.block_ids(other)) & set(prefix.block_ids)
    assert not bm.allocate(_req("y", [1, 2, 3]), 3)
    bm.free(other)
    assert not bm.can_pin(4 * 5) and bm.can_pin(16)
    with pytest.raises(ValueError):
        bm.pin_prefix(4 * 5)
    bm.check_invariants()


def test_prefix_cache_keys_include_the_adapter():
    bm = BlockManager(num_blocks=32, block_size=4)
    tokens = list(range(100, 113))                   # 3 full blocks and one token
    assert _admit(bm, _req("base", tokens)) == 0
    assert _admit(bm, _req("lora-a", tokens, _lora("a"))) == 0     # same tokens, another fine-tune: no hit
    assert _admit(bm, _req("lora-b", tokens, _lora("b"))) == 0
    assert _admit(bm, _req("lora-a-2", tokens, _lora("a"))) == 12  # same fine-tune: hit
    assert _admit(bm, _req("base-2", tokens)) == 12
    bm.check_invariants()


def test_prefix_caching_behind_a_ptuning_prefix_with_a_tail():
    bm = BlockManager(num_blocks=32, block_size=4)
    prefix = bm.pin_prefix(6)                        # one shared block, tail of 2 slots
    binding = AdapterBinding("p", AdapterKind.PTUNING, b"p", prefix)
    tokens = list(range(200, 215))                   # 15 tokens: own blocks hold [2 tail + 2], 4, 4, 4, 1
    first = _req("one", tokens, binding)
    assert _admit(bm, first) == 0
    again = _req("two", tokens, binding)
    # Cached own blocks must leave one token to compute: (15 - 1 + 2) // 4 = 4 blocks = 14 tokens.
    assert _admit(bm, again) == 14
    assert bm.block_ids(again)[1:5] == bm.block_ids(first)[1:5]
    other = AdapterBinding("q", AdapterKind.PTUNING, b"q", bm.pin_prefix(6))
    assert _admit(bm, _req("three", tokens, other)) == 0            # another prefix: nothing shared
    bm.check_invariants()
