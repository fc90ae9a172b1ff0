"""Sampler: penalties, temperature, min-p, top-k, top-p, per-request seeds, and logprobs, batched over rows.

Order, as in vLLM: penalties on the raw logits, then temperature, then min-p, top-k and top-p (top-p over what
top-k left). Greedy rows take the argmax after penalties. Logprobs are those of the raw model output. A row with
its own generator (a request with a seed) draws alone, so its tokens do not depend on the rest of the batch.
The sampler keeps each seeded sequence's generator from its first draw until the engine releases the sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from workers.sampling_params import SamplingParams


class SampleRow(NamedTuple):
    params: SamplingParams
    seq_id: int  # whose generator draws, when seeded
    seed: int | None  # the sample's own seed (the request's seed + the sample's index)
    prompt_ids: list[int]  # for the repetition penalty (empty when the request has no penalties)
    output_ids: list[int]  # for all three penalties (empty when the request has no penalties)
    num_resumed: int = 0  # tokens its seed drew on another engine, before this one took the sample over


class TokenLogprobs(NamedTuple):
    token_id: int
    logprob: float
    rank: int  # 1: the most likely token
    top: tuple[tuple[int, float], ...]  # the params.logprobs most likely (token id, logprob)


class SampleResult(NamedTuple):
    token_id: int
    logprobs: TokenLogprobs | None


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self.first_max = chunked_first_max if device.type == "cpu" else first_max  # chosen once, for the device
        self.generators: dict[int, torch.Generator] = {}  # seq id -> its seeded generator

    def release(self, seq_ids) -> None:
        for i in seq_ids:
            self.generators.pop(i, None)

    def generator(self, row: SampleRow, vocab: int) -> torch.Generator | None:
        """A seeded row's generator; made at its first draw, and then, for a sample resumed from another engine,
        advanced past the draws made there (a draw takes the same random numbers whatever the probabilities)."""
        if row.seed is None:
            return None
        gen = self.generators.get(row.seq_id)
        if gen is None:
            gen = self.generators[row.seq_id] = torch.Generator(device=self.device).manual_seed(row.seed)
            uniform = torch.ones(vocab, device=self.device)  # [V]
            for _ in range(row.num_resumed):
                torch.multinomial(uniform, 1, generator=gen)
        return gen

    def __call__(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> list[SampleResult]:
        """logits [B, V] -> one token per row."""
        raw = logits.float()  # [B, V]
        logits = self._penalize(raw, rows) if any(r.params.has_penalties for r in rows) else raw
        tokens = self.first_max(logits)  # [B]
        drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
        if drawn:
            tokens[drawn] = self._draw(logits[drawn], [rows[i] for i in drawn])
        ids = tokens.tolist()
        want = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        logprobs: list[TokenLogprobs | None] = [None] * len(rows)
        if want:
            lp = raw[want].log_softmax(dim=-1)  # [W, V]
            chosen = lp.gather(1, tokens[want, None])  # [W, 1]
            ranks = (lp > chosen).sum(dim=-1) + 1  # [W]
            k = max(rows[i].params.logprobs for i in want)
            top_lp, top_ids = lp.topk(k, dim=-1)  # [W, k]
            for j, i in enumerate(want):
                n = rows[i].params.logprobs
                top = tuple(zip(top_ids[j, :n].tolist(), top_lp[j, :n].tolist()))
                logprobs[i] = TokenLogprobs(ids[i], chosen[j, 0].item(), int(ranks[j]), top)
        return [SampleResult(t, lp) for t, lp in zip(ids, logprobs)]

    @staticmethod
    def _penalize(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
        logits = logits.clone()
        V = logits.shape[-1]
        for i, r in enumerate(rows):
            p = r.params
            if not p.has_penalties:
                continue
            counts = torch.bincount(torch.tensor(r.output_ids, dtype=torch.long), minlength=V)[:V]  # [V]
            counts = counts.to(logits.device, logits.dtype)
            row = logits[i]
            if p.repetition_penalty != 1.0:
                seen = counts > 0
                seen[torch.tensor(r.prompt_ids, dtype=torch.long, device=logits.device)] = True
                penalized = torch.where(row > 0, row / p.repetition_penalty, row * p.repetition_penalty)
                row = torch.where(seen, penalized, row)
            logits[i] = row - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).to(row.dtype)
        return logits

    def _draw(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
        """logits [R, V] of non-greedy rows -> tokens [R]."""
        dev = logits.device
        temps = torch.tensor([r.params.temperature for r in rows], device=dev)
        logits = logits / temps[:, None]  # [R, V]
        if any(r.params.truncates for r in rows):
            logits = _truncate(logits, rows)
        probs = logits.softmax(dim=-1)  # [R, V]
        out = torch.empty(len(rows), dtype=torch.long, device=dev)
        seeded = [i for i, r in enumerate(rows) if r.seed is not None]
        for i in seeded:
            out[i] = torch.multinomial(probs[i], 1, generator=self.generator(rows[i], probs.shape[-1]))[0]
        rest = [i for i, r in enumerate(rows) if r.seed is None]
        if rest:
            out[rest] = torch.multinomial(probs[rest], 1)[:, 0]
        return out


def _truncate(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Masks to -inf what min-p, top-k and top-p drop, in the sorted order of each row."""
    R, V = logits.shape
    dev = logits.device
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # [R, V]
    rank = torch.arange(V, device=dev)[None, :]  # [1, V]
    min_p = torch.tensor([r.params.min_p for r in rows], device=dev)[:, None]  # [R, 1]
    top_k = torch.tensor([r.params.top_k if r.params.top_k > 0 else V for r in rows], device=dev)[:, None]
    top_p = torch.tensor([r.params.top_p for r in rows], device=dev)[:, None]
    probs = sorted_logits.softmax(dim=-1)  # [R, V]
    drop = (probs < min_p * probs[:, :1]) | (rank >= top_k)  # [R, V]
    kept = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)  # [R, V]
    drop |= kept.cumsum(dim=-1) - kept > top_p  # the smallest prefix that reaches top_p is kept
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def first_max(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B]: each row's first index of its maximum (a NaN's, where there is one), as argmax gives."""
    return logits.max(dim=-1).indices


MAX_CHUNK = 256  # logits per chunk in chunked_first_max


def chunked_first_max(logits: torch.Tensor) -> torch.Tensor:
    """first_max in three vectorized passes, for CPUs, where max(dim) and argmax over a row step one logit at a time
    (64 x 8192 logits: ~620 us; chunked ~170-270; at a 102400 vocabulary ~3.5-5 ms against ~0.6-1.3): the chunks'
    maxima (amax), the first chunk that holds the row's maximum, then the first index of it within that chunk."""
    B, V = logits.shape
    if V % MAX_CHUNK:
        logits = F.pad(logits, (0, -V % MAX_CHUNK), value=float("-inf"))  # never a maximum
    chunks = logits.reshape(B, logits.shape[1] // MAX_CHUNK, MAX_CHUNK)  # [B, V / C, C]
    best = chunks.amax(dim=-1).argmax(dim=-1)  # [B]: NaN propagates through amax, and argmax takes it
    inside = chunks[torch.arange(B, device=logits.device), best].argmax(dim=-1)  # [B]
    return best * MAX_CHUNK + inside
