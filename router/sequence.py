"""Sequence: one request's tokens, cache blocks and progress."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workers.sampling_params import SamplingParams


@dataclass(eq=False)
class Sequence:
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose KV is in the cache
    finish_reason: str | None = None
    text: str | None = None  # set when a stop string cut the output
    generator: torch.Generator | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_slice(self, start: int, stop: int) -> list[int]:
        n = len(self.prompt_ids)
        if stop <= n:
            return self.prompt_ids[start:stop]
        if start >= n:
            return self.output_ids[start - n : stop - n]
        return self.prompt_ids[start:] + self.output_ids[: stop - n]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
