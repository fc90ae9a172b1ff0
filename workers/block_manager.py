"""BlockManager: hands out the paged cache's blocks to sequences."""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free = deque(range(num_blocks))

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - len(block_table))

    def can_grow(self, block_table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(block_table, num_tokens) <= len(self.free)

    def grow(self, block_table: list[int], num_tokens: int) -> None:
        """Extends block_table in place so that it holds num_tokens tokens."""
        for _ in range(self.blocks_needed(block_table, num_tokens)):
            block_table.append(self.free.popleft())

    def release(self, block_table: list[int]) -> None:
        self.free.extend(block_table)
        block_table.clear()

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks
