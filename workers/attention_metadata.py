"""AttentionMetadata: where a step's flat tokens sit in their sequences and in the paged cache.

The flat batch holds the decode sequences (one new token each) first, then the prefill chunks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # [B, max_blocks] block ids of each sequence, padded with 0
    context_lens: torch.Tensor  # [B] tokens in the cache after this step, per sequence
    query_lens: tuple[int, ...]  # new tokens of each sequence, in the order of the flat batch
    context_lens_list: tuple[int, ...]  # context_lens, on the host
    block_size: int
    num_decodes: int  # the first num_decodes sequences have one new token each

    def prefills(self, first: int | None = None):
        """Yields (i, start, query_len, context_len) for each sequence from `first` on (default: the prefill chunks).

        The sequences before `first` must be decodes (one token each), so sequence `first` starts at token `first`.
        """
        start = self.num_decodes if first is None else first
        assert start <= self.num_decodes
        for i in range(start, len(self.query_lens)):
            q, c = self.query_lens[i], self.context_lens_list[i]
            yield i, start, q, c
            start += q

    def context(self, cache: torch.Tensor, i: int) -> torch.Tensor:
        """Sequence i's cached entries: cache [N, bs, *E] -> [C, *E]."""
        c = self.context_lens_list[i]
        blocks = self.block_tables[i, : (c + self.block_size - 1) // self.block_size]
        return cache.index_select(0, blocks).flatten(0, 1)[:c]

    def decode_context(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The decode sequences' entries, padded: cache [N, bs, *E] -> ([B, S, *E], valid mask [B, S])."""
        B = self.num_decodes
        longest = max(self.context_lens_list[:B])
        blocks = self.block_tables[:B, : (longest + self.block_size - 1) // self.block_size]  # [B, M]
        # index_select copies whole blocks; advanced indexing (cache[blocks]) goes element by element, ~5x slower
        entries = cache.index_select(0, blocks.flatten()).view(B, -1, *cache.shape[2:])  # [B, M*bs, *E]
        positions = torch.arange(entries.shape[1], device=cache.device)[None, :]  # [1, S]
        return entries, positions < self.context_lens[:B, None]


def store(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """Writes values [T, *E] into cache [N, bs, *E] at the flat slots."""
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, values.to(cache.dtype))
