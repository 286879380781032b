"""BlockManager: allocation, ref counts, LRU free list, chained-hash prefix caching, invariants."""
from __future__ import annotations

from glmserve.engine.core.block_manager import BlockManager, hash_block
from glmserve.engine.core.request import Request
from glmserve.engine.core.sampling_params import SamplingParams


def _req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4))


def _admit(bm: BlockManager, req: Request) -> int:
    cached = bm.find_cached_prefix(req)
    num_cached = len(cached) * bm.block_size
    assert bm.allocate(req, req.num_tokens - num_cached, cached)
    req.num_computed_tokens = req.num_tokens
    return num_cached


def test_allocate_grows_by_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=8, block_size=4)
    req = _req("a", list(range(10)))          # 10 tokens -> 3 blocks
    assert _admit(bm, req) == 0
    assert len(bm.block_ids(req)) == 3 and bm.num_free_blocks == 5
    req.token_ids.append(99)                   # 11 tokens: still 3 blocks
    assert bm.allocate(req, 1)
    assert len(bm.block_ids(req)) == 3
    req.num_computed_tokens += 1
    req.token_ids.append(100)                  # 12 tokens fill block 3; the 13th needs a 4th
    assert bm.allocate(req, 1) and len(bm.block_ids(req)) == 3
    req.num_computed_tokens += 1
    req.token_ids.append(101)
    assert bm.allocate(req, 1) and len(bm.block_ids(req)) == 4
    bm.check_invariants()
    bm.free(req)
    assert bm.num_free_blocks == 8
    bm.check_invariants()


def test_allocation_failure_changes_nothing():
    bm = BlockManager(num_blocks=2, block_size=4)
    req = _req("a", list(range(12)))           # needs 3 blocks
    assert not bm.allocate(req, 12)
    assert bm.num_free_blocks == 2 and bm.block_ids(req) == []
    bm.check_invariants()


def test_prefix_hit_shares_blocks_and_last_user_frees():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = _req("a", list(range(9)))              # 2 full blocks + 1 partial
    _admit(bm, a)
    b = _req("b", list(range(8)) + [77, 78])   # same first two blocks
    assert _admit(bm, b) == 8
    assert bm.block_ids(a)[:2] == bm.block_ids(b)[:2]
    assert bm.blocks[bm.block_ids(a)[0]].ref_count == 2
    bm.free(a)
    shared = bm.block_ids(b)[0]
    assert bm.blocks[shared].ref_count == 1 and shared not in bm.free_queue
    bm.free(b)
    assert bm.num_free_blocks == 16
    bm.check_invariants()


def test_at_least_one_token_is_left_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    _admit(bm, _req("a", list(range(8))))
    again = _req("b", list(range(8)))          # fully cached prompt: the last block is recomputed
    assert _admit(bm, again) == 4


def test_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = _req("a", list(range(8)))
    _admit(bm, a)
    bm.free(a)                                 # blocks keep their hashes in the free list
    b = _req("b", list(range(8)) + [5])
    assert _admit(bm, b) == 8                  # revived from the free list
    bm.free(b)
    c = _req("c", [50 + i for i in range(16)]) # needs every block: evicts the cached ones
    assert _admit(bm, c) == 0
    assert not bm.cached or all(bm.blocks[i].block_hash is not None for i in bm.cached.values())
    bm.free(c)
    d = _req("d", list(range(8)) + [5])
    assert _admit(bm, d) == 0                  # the old prefix is gone
    bm.check_invariants()


def test_chained_hash_depends_on_the_whole_prefix():
    h1 = hash_block(None, [1, 2, 3, 4])
    assert hash_block(h1, [5, 6, 7, 8]) != hash_block(hash_block(None, [0, 2, 3, 4]), [5, 6, 7, 8])
    assert hash_block(None, [1, 2, 3, 4]) == h1


def test_prefix_caching_off_never_shares():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    _admit(bm, _req("a", list(range(8))))
    assert _admit(bm, _req("b", list(range(9)))) == 0
    bm.check_invariants()
