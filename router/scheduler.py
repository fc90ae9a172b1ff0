"""Scheduler: decides each step's work within the token and sequence budgets.

Prefill chunks of waiting sequences go first (a long prompt spans several steps), else one decode token for every
running sequence. When the cache runs out during decode, the newest running sequence is preempted by recompute:
its blocks are freed and it returns to the front of the queue, to be prefilled again with its output so far.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from router.engine_config import EngineConfig
from router.sequence import Sequence
from workers.block_manager import BlockManager


class Scheduled(NamedTuple):
    seq: Sequence
    num_new: int  # tokens computed this step
    sample: bool  # a token is sampled after them


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.blocks = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        return self._schedule_prefill() or self._schedule_decode()

    def _schedule_prefill(self) -> list[Scheduled]:
        out, budget = [], self.config.max_num_batched_tokens
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_cached, budget)
            if not self.blocks.can_grow(seq.block_table, seq.num_cached + n):
                break
            self.blocks.grow(seq.block_table, seq.num_cached + n)
            done = seq.num_cached + n == seq.num_tokens
            out.append(Scheduled(seq, n, done))
            budget -= n
            if not done:
                break  # the rest of this prompt goes in the next step
            self.running.append(self.waiting.popleft())
        return out

    def _schedule_decode(self) -> list[Scheduled]:
        out = []
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted below
            while not self.blocks.can_grow(seq.block_table, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                self.blocks.grow(seq.block_table, seq.num_tokens)
                out.append(Scheduled(seq, 1, True))
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq.block_table)
        seq.num_cached = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_table)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
