"""EngineStats: what the engine is doing, for metrics and load balancing."""

from __future__ import annotations

from typing import NamedTuple


class EngineStats(NamedTuple):
    running: int  # sequences in the batch
    waiting: int  # sequences queued (new or preempted)
    kv_usage: float  # fraction of cache blocks referenced by some sequence
    prefix_hit_rate: float  # fraction of prompt tokens served from the prefix cache
    num_preemptions: int
    num_blocks: int
    block_size: int
