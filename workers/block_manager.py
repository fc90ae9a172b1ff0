"""BlockManager: reference-counted cache blocks with hash-chained prefix caching and LRU eviction.

A full block that has been computed is registered under the hash of (its parent block's hash, its token ids), so
a chain of hashes names a whole prefix. A later sequence that starts with the same tokens takes references on those
blocks instead of computing them again. Blocks that nothing references sit in `free`, oldest release first; a
cached block there keeps its contents until it is taken for new tokens (LRU eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol


class CachedSequence(Protocol):
    """What the block manager needs of a sequence."""

    block_table: list[int]
    block_hashes: list[int]  # hash of each full, computed block, in order
    num_cached: int  # tokens whose KV is in the cache
    num_tokens: int

    def token_slice(self, start: int, stop: int) -> list[int]: ...


@dataclass(eq=False)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()  # checked on a hit, so that a hash collision can never alias two prefixes


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # first out = evicted first
        self.cached: dict[int, int] = {}  # chain hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    # --- prefix cache ---

    def match_prefix(self, seq: CachedSequence) -> list[int]:
        """Block ids of the longest cached prefix of seq's tokens, leaving at least one token to compute."""
        if not self.enable_prefix_caching:
            return []
        bs, hits, parent = self.block_size, [], None
        for i in range((seq.num_tokens - 1) // bs):
            tokens = tuple(seq.token_slice(i * bs, (i + 1) * bs))
            parent = chain_hash(parent, tokens)
            block_id = self.cached.get(parent)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
        return hits

    def blocks_to_take(self, hits: list[int]) -> int:
        """How many free blocks taking these hits would use up (those that nothing references now)."""
        return sum(1 for b in hits if self.blocks[b].ref_count == 0)

    def take_prefix(self, seq: CachedSequence, hits: list[int]) -> None:
        """Gives seq references on its cached prefix blocks; seq must hold no blocks yet."""
        assert not seq.block_table and seq.num_cached == 0
        for b in hits:
            self._ref(b)
        seq.block_table.extend(hits)
        seq.block_hashes[:] = [self.blocks[b].hash for b in hits]
        seq.num_cached = len(hits) * self.block_size

    def count_query(self, num_tokens: int, num_hit: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit

    def commit(self, seq: CachedSequence) -> None:
        """Registers seq's newly computed full blocks in the prefix cache."""
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_cached // bs):
            tokens = tuple(seq.token_slice(i * bs, (i + 1) * bs))
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(h)
            block = self.blocks[seq.block_table[i]]
            if self.enable_prefix_caching and block.hash is None and h not in self.cached:
                block.hash, block.token_ids = h, tokens
                self.cached[h] = block.block_id

    def pin(self, hashes: list[int]) -> list[int]:
        """References on the cached blocks of a hash chain, as far as it is still cached (a session holding its
        history between turns). Give them back with release()."""
        pinned = []
        for h in hashes:
            block_id = self.cached.get(h)
            if block_id is None:
                break
            self._ref(block_id)
            pinned.append(block_id)
        return pinned

    # --- allocation ---

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    def can_grow(self, block_table: list[int], num_tokens: int, reserved: int = 0) -> bool:
        return self.blocks_needed(block_table, num_tokens) + reserved <= len(self.free)

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Extends block_table in place so that it holds num_tokens tokens, evicting the oldest free blocks."""
        for _ in range(self.blocks_needed(block_table, num_tokens)):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # evict its cached contents
                del self.cached[block.hash]
                block.hash, block.token_ids = None, ()
            block.ref_count = 1
            block_table.append(block_id)

    def fork(self, block_table: list[int], num_blocks: int) -> list[int]:
        """A new table sharing the first num_blocks blocks of block_table."""
        shared = block_table[:num_blocks]
        for b in shared:
            self._ref(b)
        return list(shared)

    def release(self, block_table: list[int]) -> None:
        """Drops a sequence's references. Cached blocks stay reusable until evicted; uncached ones go first."""
        for block_id in reversed(block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:
                    self.free.move_to_end(block_id, last=False)
        block_table.clear()

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    # --- stats ---

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some sequence (cached but unreferenced blocks count as free)."""
        return 1.0 - len(self.free) / self.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
