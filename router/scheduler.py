"""Scheduler: each step's work within a token budget, decode and prefill mixed (continuous batching).

Running sequences go first, oldest first: each gets the tokens it has left to compute (one when decoding, a
chunk of its prompt while prefilling), as far as `max_num_batched_tokens` allows. Waiting sequences are then
admitted while the budget, `max_num_seqs` and the free blocks allow; each first takes whatever prefix of its tokens
the prefix cache holds. When the cache runs out, the newest running sequence is preempted by recompute: its
blocks are released (its computed full blocks stay in the prefix cache) and it returns to the front of the queue.
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
    sample: bool  # the sequence is then fully computed, and a token is sampled after them


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
        """This step's sequences, decodes (one token) first, then prefill chunks."""
        budget = self.config.max_num_batched_tokens
        out: list[Scheduled] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_to_compute, budget)
            while not self.blocks.can_grow(seq.block_table, seq.num_cached + n):
                preempted = True
                victim = self.running.pop()  # the newest
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.grow(seq.block_table, seq.num_cached + n)
                out.append(Scheduled(seq, n, n == seq.num_to_compute))
                budget -= n
                i += 1
        while self.waiting and budget > 0 and not preempted and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hits = self.blocks.match_prefix(seq)
            cached = len(hits) * self.blocks.block_size
            n = min(seq.num_tokens - cached, budget)
            if not self.blocks.can_grow(hits, cached + n, reserved=self.blocks.blocks_to_take(hits)):
                break
            self.blocks.take_prefix(seq, hits)
            if not seq.output_ids:  # a first admission, not a resumption after preemption
                seq.num_prompt_hit = seq.num_cached
                self.blocks.count_query(len(seq.prompt_ids), seq.num_cached)
            self.blocks.grow(seq.block_table, seq.num_cached + n)
            self.running.append(self.waiting.popleft())
            out.append(Scheduled(seq, n, n == seq.num_to_compute))
            budget -= n
        out.sort(key=lambda s: s.num_new > 1)  # stable: decodes first, each group in running order
        return out

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_table)
        seq.block_hashes.clear()
        seq.num_cached = 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def add_running(self, seq: Sequence) -> None:
        """A forked sample joins the batch beside its parent (it already holds the prompt's blocks)."""
        self.running.append(seq)

    def finish(self, seq: Sequence) -> None:
        self.blocks.release(seq.block_table)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
