"""EngineStats: what the engine is doing, for metrics and load balancing."""

from __future__ import annotations

from typing import NamedTuple

from router.worker_stats import WorkerStats


class EngineStats(NamedTuple):
    running: int  # sequences in the batch
    waiting: int  # sequences queued (new or preempted)
    kv_usage: float  # fraction of cache blocks referenced by some sequence
    prefix_hit_rate: float  # fraction of prompt tokens served from the prefix cache
    num_preemptions: int
    num_blocks: int
    block_size: int
    outstanding_tokens: int = 0  # tokens still to compute: prompts left to prefill plus tokens left to generate
    workers: WorkerStats | None = None  # per expert and per worker, read every few seconds (not summed by plus)

    def plus(self, other: "EngineStats") -> "EngineStats":
        """Two engines' stats as one: KV usage weighted by blocks, hit rates averaged."""
        blocks = self.num_blocks + other.num_blocks
        return EngineStats(self.running + other.running, self.waiting + other.waiting,
                           (self.kv_usage * self.num_blocks + other.kv_usage * other.num_blocks) / blocks,
                           (self.prefix_hit_rate + other.prefix_hit_rate) / 2, self.num_preemptions +
                           other.num_preemptions, blocks, self.block_size,
                           self.outstanding_tokens + other.outstanding_tokens)
