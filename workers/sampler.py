"""Sampler: greedy, temperature, top-k and top-p, with a per-request generator for reproducible seeds."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from workers.sampling_params import SamplingParams


class Sampler:
    def __call__(self, logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None]) -> list[int]:
        """logits [B, V] float32 -> one token id per row."""
        out = logits.argmax(dim=-1)  # [B]
        rows = [i for i, p in enumerate(params) if not p.greedy]
        for i in rows:
            out[i] = self._sample(logits[i], params[i], generators[i])
        return out.tolist()

    @staticmethod
    def _sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
        logits = logits / p.temperature  # [V]
        if p.top_k > 0:
            kth = logits.topk(min(p.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            probs = sorted_logits.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs > p.top_p  # keep the smallest prefix reaching top_p
            logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
        probs = logits.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[0]
