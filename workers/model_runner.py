"""ModelRunner: owns the model and its paged cache; turns a step's chunks into one forward pass and samples."""

from __future__ import annotations

from typing import NamedTuple

import torch

from workers.attention_metadata import AttentionMetadata
from workers.causal_lm import CausalLM
from workers.kv_cache import KVCache
from workers.sampler import SampleResult, SampleRow, Sampler


class SeqChunk(NamedTuple):
    token_ids: list[int]  # the new tokens to run
    start: int  # position of the first one (= tokens already cached)
    block_table: list[int]
    samples: tuple[SampleRow, ...]  # tokens to sample after the last one: none mid-prompt, n when forking


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: KVCache, device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.sampler = Sampler()

    def prepare(self, chunks: list[SeqChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Flattens the chunks. The leading one-token chunks take the batched decode path, so schedule them first."""
        bs = self.kv_cache.block_size
        ids, positions, slots = [], [], []
        for c in chunks:
            ids.extend(c.token_ids)
            pos = range(c.start, c.start + len(c.token_ids))
            positions.extend(pos)
            slots.extend(c.block_table[p // bs] * bs + p % bs for p in pos)
        num_decodes = next((i for i, c in enumerate(chunks) if len(c.token_ids) > 1), len(chunks))
        width = max(len(c.block_table) for c in chunks)
        tables = [c.block_table + [0] * (width - len(c.block_table)) for c in chunks]
        context = [c.start + len(c.token_ids) for c in chunks]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.long, device=dev),
            context_lens=torch.tensor(context, dtype=torch.long, device=dev),
            query_lens=tuple(len(c.token_ids) for c in chunks),
            context_lens_list=tuple(context),
            block_size=bs,
            num_decodes=num_decodes,
        )
        return (torch.tensor(ids, dtype=torch.long, device=dev),
                torch.tensor(positions, dtype=torch.long, device=dev), meta)

    @torch.inference_mode()
    def forward_logits(self, chunks: list[SeqChunk], all_positions: bool = False) -> torch.Tensor:
        """Logits [S, V]: one row per sample of each chunk (every token's row with all_positions)."""
        input_ids, positions, meta = self.prepare(chunks)
        hidden = self.model(input_ids, positions, self.kv_cache, meta)  # [T, D]
        if not all_positions:
            ends = torch.tensor(meta.query_lens, device=self.device).cumsum(0) - 1  # [B]
            repeats = torch.tensor([len(c.samples) for c in chunks], device=self.device)  # [B]
            hidden = hidden[ends.repeat_interleave(repeats)]  # [S, D]
        return self.model.compute_logits(hidden)

    def step(self, chunks: list[SeqChunk]) -> list[SampleResult]:
        """Runs the chunks; returns their samples' tokens, in order."""
        logits = self.forward_logits(chunks)
        rows = [row for c in chunks for row in c.samples]
        return self.sampler(logits, rows) if rows else []
