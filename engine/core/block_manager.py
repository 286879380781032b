"""The KV-cache block pool: allocation, reference counts, an LRU free list and prefix caching.

Pure Python and torch-free. A block holds ``block_size`` consecutive tokens of one or more requests' KV.
Prefix caching identifies a full block by a chained hash: sha256 over the parent block's hash and the block's
token ids, so equal hashes mean equal prefixes (collision-safe in practice, unlike Python's ``hash``).
Blocks whose reference count drops to zero go to the back of the free list but keep their hash, so a later
request with the same prefix can take them back until they are reused for something else (LRU eviction).
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from glmserve.engine.core.request import Request, RequestKey


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None     # set once the block is full and registered in the prefix cache


@dataclass
class PrefixCacheStats:
    queries: int = 0    # prompt tokens looked up
    hits: int = 0       # prompt tokens found in the cache


def hash_block(parent: bytes | None, token_ids: list[int]) -> bytes:
    digest = hashlib.sha256(parent or b"")
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU order
        self.cached: dict[bytes, int] = {}           # block hash -> block id
        self.req_blocks: dict[RequestKey, list[int]] = {}
        self.req_hashes: dict[RequestKey, list[bytes]] = {}  # chained hashes of the request's full blocks
        self.stats = PrefixCacheStats()

    # ---- queries ----------------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_ids(self, request: Request) -> list[int]:
        return self.req_blocks.get(request.key, [])

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache lookup ----------------------------------------------------------------------------------
    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks holding the longest cached prefix of the request's tokens (full blocks only).

        At least one token is always left to compute, since its logits are needed for the next token.
        """
        if not self.enable_prefix_caching:
            return []
        hashes = self._block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        found: list[int] = []
        for block_hash in hashes[:max_blocks]:
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def record_prefix_lookup(self, num_queried: int, num_hit: int) -> None:
        """Counted by the scheduler once per admission, not per lookup attempt."""
        self.stats.queries += num_queried
        self.stats.hits += num_hit

    # ---- allocation -------------------------------------------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int, cached_prefix: list[int] = ()) -> bool:
        """Make room for ``num_new_tokens`` more tokens after the computed ones (and take ``cached_prefix``
        on first admission). Returns False, changing nothing, when the pool is too small right now."""
        owned = self.req_blocks.get(request.key, [])
        num_computed = len(cached_prefix) * self.block_size if cached_prefix else request.num_computed_tokens
        needed = self.blocks_needed(num_computed + num_new_tokens) - len(owned) - len(cached_prefix)
        # Cached blocks that sit in the free list are taken out of it, so they count against the free blocks.
        revived = sum(1 for b in cached_prefix if self.blocks[b].ref_count == 0)
        if needed + revived > self.num_free_blocks:
            return False
        owned = self.req_blocks.setdefault(request.key, owned)
        for block_id in cached_prefix:
            self._take(block_id)
            owned.append(block_id)
        for _ in range(max(0, needed)):
            block_id = next(iter(self.free_queue))
            self._evict(block_id)
            self._take(block_id)
            owned.append(block_id)
        # Register full blocks now: a request admitted later in the same step may reuse them, which is safe
        # because every layer writes the whole batch's K/V before any attention reads it.
        self._register_full_blocks(request, num_computed + num_new_tokens)
        return True

    def free(self, request: Request) -> None:
        """Release the request's blocks (tail first, so shared prefixes are evicted last)."""
        owned = self.req_blocks.pop(request.key, [])
        self.req_hashes.pop(request.key, None)
        for block_id in reversed(owned):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    def reset_prefix_cache(self) -> None:
        for block_hash, block_id in list(self.cached.items()):
            if self.blocks[block_id].ref_count == 0:
                self.blocks[block_id].block_hash = None
                del self.cached[block_hash]

    # ---- internals --------------------------------------------------------------------------------------------
    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash = None

    def _block_hashes(self, request: Request) -> list[bytes]:
        """Chained hashes of all full blocks of the request's tokens, extended incrementally."""
        hashes = self.req_hashes.setdefault(request.key, [])
        tokens = request.token_ids
        for i in range(len(hashes), len(tokens) // self.block_size):
            chunk = tokens[i * self.block_size:(i + 1) * self.block_size]
            hashes.append(hash_block(hashes[-1] if hashes else None, chunk))
        return hashes

    def _register_full_blocks(self, request: Request, num_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        owned = self.req_blocks[request.key]
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        hashes = self._block_hashes(request)
        for i in range(num_full):
            block = self.blocks[owned[i]]
            if block.block_hash is None:
                block.block_hash = hashes[i]
                self.cached.setdefault(hashes[i], block.block_id)

    def check_invariants(self) -> None:
        """Ref counts equal the number of owners; the free list holds exactly the unreferenced blocks."""
        counts = [0] * self.num_blocks
        for owned in self.req_blocks.values():
            assert len(set(owned)) == len(owned), "a request owns a block twice"
            for block_id in owned:
                counts[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == counts[block.block_id], f"block {block.block_id} ref count is off"
            assert (block.ref_count == 0) == (block.block_id in self.free_queue), f"block {block.block_id} free list"
        for block_hash, block_id in self.cached.items():
            assert self.blocks[block_id].block_hash == block_hash, "prefix cache points at a re-used block"
