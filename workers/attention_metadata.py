"""AttentionMetadata: where a step's flat tokens sit in their sequences and in the paged cache."""

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

    @property
    def is_decode(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    def sequences(self):
        """Yields (i, start, query_len, context_len) for each sequence of the flat batch."""
        start = 0
        for i, (q, c) in enumerate(zip(self.query_lens, self.context_lens_list)):
            yield i, start, q, c
            start += q

    def context(self, cache: torch.Tensor, i: int) -> torch.Tensor:
        """Sequence i's cached entries: cache [N, bs, *E] -> [C, *E]."""
        c = self.context_lens_list[i]
        blocks = self.block_tables[i, : (c + self.block_size - 1) // self.block_size]
        return cache[blocks].flatten(0, 1)[:c]

    def batch_context(self, cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All sequences' entries, padded: cache [N, bs, *E] -> ([B, S, *E], valid mask [B, S])."""
        longest = max(self.context_lens_list)
        blocks = self.block_tables[:, : (longest + self.block_size - 1) // self.block_size]  # [B, M]
        entries = cache[blocks].flatten(1, 2)  # [B, M*bs, *E]
        valid = torch.arange(entries.shape[1], device=cache.device)[None, :] < self.context_lens[:, None]  # [B, S]
        return entries, valid

    def causal_mask(self, i: int, device: torch.device) -> torch.Tensor | None:
        """[q, C] mask for sequence i's new tokens over its whole context; None when plain causal suffices."""
        q, c = self.query_lens[i], self.context_lens_list[i]
        if q == c:
            return None
        rows = torch.arange(q, device=device)[:, None] + (c - q)
        return torch.arange(c, device=device)[None, :] <= rows  # [q, C]


def store(cache: torch.Tensor, slot_mapping: torch.Tensor, values: torch.Tensor) -> None:
    """Writes values [T, *E] into cache [N, bs, *E] at the flat slots."""
    cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, values.to(cache.dtype))
