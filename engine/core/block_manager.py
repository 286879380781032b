"""The KV-cache block pool: allocation, reference counts, an LRU free list and prefix caching.

Pure Python and torch-free. A block holds ``block_size`` consecutive tokens of one or more requests' KV.
Prefix caching identifies a full block by a chained hash: sha256 over the parent block's hash and the block's
token ids, so equal hashes mean equal prefixes (collision-safe in practice, unlike Python's ``hash``).
Blocks whose reference count drops to zero go to the back of the free list but keep their hash, so a later
request with the same prefix can take them back until they are reused for something else (LRU eviction).

Fine-tunes (core/adapters.py): the hash chain of a request's blocks starts from its adapter's ``cache_salt``, so
two fine-tunes (or one and the base model) never share KV. A P-tuning prefix is a run of pinned blocks (reference
held by the fine-tune, never evicted while it is loaded): its P slots come first in every sequence of that
fine-tune, so the request's token i sits in slot P + i of its block table. The full prefix blocks are shared
(each request takes a reference on admission); the request's own blocks follow, the first of them starting with
the prefix's last P % block_size slots. Only own blocks are hashed and cached.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from glmserve.engine.core.adapters import KVPrefix
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
        self.req_hashes: dict[RequestKey, list[bytes]] = {}  # chained hashes of the request's full own blocks
        self.pinned: list[KVPrefix] = []              # P-tuning prefixes, each holding one reference per block
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
        """Blocks holding the longest cached prefix of the request's tokens (full own blocks only, after any
        P-tuning prefix).

        At least one token is always left to compute, since its logits are needed for the next token.
        """
        if not self.enable_prefix_caching:
            return []
        hashes = self._block_hashes(request)
        max_blocks = (request.num_tokens - 1 + _tail(request, self.block_size)) // self.block_size
        found: list[int] = []
        for block_hash in hashes[:max_blocks]:
            block_id = self.cached.get(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        return found

    def cached_tokens(self, request: Request, cached_prefix: list[int]) -> int:
        """How many of the request's tokens the blocks from ``find_cached_prefix`` hold."""
        if not cached_prefix:
            return 0
        return len(cached_prefix) * self.block_size - _tail(request, self.block_size)

    def record_prefix_lookup(self, num_queried: int, num_hit: int) -> None:
        """Counted by the scheduler once per admission, not per lookup attempt."""
        self.stats.queries += num_queried
        self.stats.hits += num_hit

    # ---- allocation -------------------------------------------------------------------------------------------
    def allocate(self, request: Request, num_new_tokens: int, cached_prefix: list[int] = ()) -> bool:
        """Make room for ``num_new_tokens`` more tokens after the computed ones (and take ``cached_prefix``
        on first admission). Returns False, changing nothing, when the pool is too small right now."""
        owned = self.req_blocks.get(request.key, [])
        prefix = _kv_prefix(request)
        # A P-tuning request takes its shared prefix blocks on first admission (pinned: never in the free list).
        shared = prefix.shared_block_ids if prefix is not None and not owned else ()
        num_slots_before = prefix.num_slots if prefix is not None else 0
        num_computed = self.cached_tokens(request, cached_prefix) if cached_prefix else request.num_computed_tokens
        needed = (self.blocks_needed(num_slots_before + num_computed + num_new_tokens) - len(owned) - len(shared)
                  - len(cached_prefix))
        # Cached blocks that sit in the free list are taken out of it, so they count against the free blocks.
        revived = sum(1 for b in cached_prefix if self.blocks[b].ref_count == 0)
        if needed + revived > self.num_free_blocks:
            return False
        owned = self.req_blocks.setdefault(request.key, owned)
        for block_id in shared:
            self._take(block_id)
            owned.append(block_id)
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
            self._release(block_id)

    # ---- P-tuning prefixes ------------------------------------------------------------------------------------
    def can_pin(self, num_slots: int) -> bool:
        return self.blocks_needed(num_slots) <= self.num_free_blocks

    def pin_prefix(self, num_slots: int) -> KVPrefix:
        """Take ``ceil(num_slots / block_size)`` blocks for a P-tuning prefix; they stay referenced (never evicted)
        until ``unpin_prefix``. Check ``can_pin`` first."""
        if num_slots < 1 or not self.can_pin(num_slots):
            raise ValueError(f"cannot pin {num_slots} prefix slots with {self.num_free_blocks} free blocks")
        block_ids = []
        for _ in range(self.blocks_needed(num_slots)):
            block_id = next(iter(self.free_queue))
            self._evict(block_id)
            self._take(block_id)
            block_ids.append(block_id)
        prefix = KVPrefix(tuple(block_ids), num_slots, self.block_size)
        self.pinned.append(prefix)
        return prefix

    def unpin_prefix(self, prefix: KVPrefix) -> None:
        """Drop the fine-tune's own reference; blocks that no request holds any more go back to the free list."""
        self.pinned.remove(prefix)
        for block_id in reversed(prefix.block_ids):
            self._release(block_id)

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

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block_id] = None

    def _evict(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash = None

    def _block_hashes(self, request: Request) -> list[bytes]:
        """Chained hashes of all full own blocks of the request, extended incrementally. The chain starts from the
        adapter's cache salt; with a P-tuning prefix, own block i holds tokens [i*bs - tail, (i+1)*bs - tail)
        (the first one after the prefix's tail slots, which the salt stands for)."""
        hashes = self.req_hashes.setdefault(request.key, [])
        tokens = request.token_ids
        bs, tail = self.block_size, _tail(request, self.block_size)
        salt = request.adapter.cache_salt if request.adapter is not None else None
        for i in range(len(hashes), (len(tokens) + tail) // bs):
            chunk = tokens[max(0, i * bs - tail):(i + 1) * bs - tail]
            hashes.append(hash_block(hashes[-1] if hashes else salt, chunk))
        return hashes

    def _register_full_blocks(self, request: Request, num_tokens: int) -> None:
        if not self.enable_prefix_caching:
            return
        owned = self.req_blocks[request.key]
        prefix = _kv_prefix(request)
        num_shared = len(prefix.shared_block_ids) if prefix is not None else 0
        num_full = (min(num_tokens, request.num_tokens) + _tail(request, self.block_size)) // self.block_size
        hashes = self._block_hashes(request)
        for i in range(num_full):
            block = self.blocks[owned[num_shared + i]]
            if block.block_hash is None:
                block.block_hash = hashes[i]
                self.cached.setdefault(hashes[i], block.block_id)

    def check_invariants(self) -> None:
        """Ref counts equal the number of owners; the free list holds exactly the unreferenced blocks."""
        counts = [0] * self.num_blocks
        for prefix in self.pinned:
            for block_id in prefix.block_ids:
                counts[block_id] += 1
                assert self.blocks[block_id].block_hash is None, "a pinned prefix block is in the prefix cache"
        for owned in self.req_blocks.values():
            assert len(set(owned)) == len(owned), "a request owns a block twice"
            for block_id in owned:
                counts[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == counts[block.block_id], f"block {block.block_id} ref count is off"
            assert (block.ref_count == 0) == (block.block_id in self.free_queue), f"block {block.block_id} free list"
        for block_hash, block_id in self.cached.items():
            assert self.blocks[block_id].block_hash == block_hash, "prefix cache points at a re-used block"


def _kv_prefix(request: Request) -> KVPrefix | None:
    return request.adapter.kv_prefix if request.adapter is not None else None


def _tail(request: Request, block_size: int) -> int:
    """Prefix slots at the start of the request's first own block (0 without a P-tuning prefix)."""
    prefix = _kv_prefix(request)
    return prefix.num_slots % block_size if prefix is not None else 0
