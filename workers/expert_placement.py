"""ExpertPlacement: which expert worker owns each routed expert (exactly one each, for now)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertPlacement:
    owner: tuple[int, ...]  # routed expert id -> expert worker index
    num_workers: int

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError("expert placement needs at least one expert worker")
        bad = [e for e, w in enumerate(self.owner) if not 0 <= w < self.num_workers]
        if bad:
            raise ValueError(f"expert placement: expert {bad[0]} is given worker {self.owner[bad[0]]}, but the "
                             f"workers are 0..{self.num_workers - 1}")
        idle = sorted(set(range(self.num_workers)) - set(self.owner))
        if idle:
            raise ValueError(f"expert placement: expert worker {idle[0]} owns no expert; give every worker one, "
                             f"or use fewer expert workers")

    @classmethod
    def contiguous(cls, num_experts: int, num_workers: int) -> "ExpertPlacement":
        """Worker w owns one contiguous range of expert ids, the ranges as even as they can be."""
        if not 1 <= num_workers <= num_experts:
            raise ValueError(f"{num_workers} expert workers for {num_experts} routed experts: give between 1 and "
                             f"{num_experts}")
        return cls(tuple(e * num_workers // num_experts for e in range(num_experts)), num_workers)

    @classmethod
    def explicit(cls, owner: Sequence[int], num_experts: int, num_workers: int) -> "ExpertPlacement":
        if len(owner) != num_experts:
            raise ValueError(f"expert placement lists {len(owner)} owners; the model has {num_experts} routed "
                             "experts, so give one worker index per expert")
        return cls(tuple(int(w) for w in owner), num_workers)

    def experts_of(self, worker: int) -> tuple[int, ...]:
        return tuple(e for e, w in enumerate(self.owner) if w == worker)
