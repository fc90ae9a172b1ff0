"""Executor: runs each step's plans on the attention ranks, and says what each rank's KV cache holds.

Rank r's plan goes to the attention rank that owns cache r (data parallel: each rank its own sequences and
cache). `LocalExecutor` is the single-process case; `MultiprocExecutor` runs attention and expert workers as
local processes joined by torch.distributed, `cluster.ray_executor.RayExecutor` as Ray actors across nodes.
"""

from __future__ import annotations

from workers.model_runner import ModelRunner, StepPlan
from workers.sampler import SampleResult


class WorkerError(RuntimeError):
    """A worker failed or died. The executor has stopped every worker: it runs no further step."""


class Executor:
    num_blocks: tuple[int, ...]  # KV cache blocks of each attention rank
    block_size: int

    @property
    def num_ranks(self) -> int:
        return len(self.num_blocks)

    def execute(self, plans: list[StepPlan]) -> list[list[SampleResult]]:
        """One step: plans[r] runs on attention rank r; each rank's samples, in its plan's order."""
        raise NotImplementedError

    def profile(self) -> dict:
        """What each worker did, summed over the steps so far: {"steps", "control_s", "attention": [per rank:
        "steps", "busy_s", "sent" (layer -> tokens routed to each expert)], "experts": [per expert worker:
        "experts", "rounds", "compute_s", "wait_s", ...]}."""
        raise NotImplementedError

    def shutdown(self) -> None:
        pass


class LocalExecutor(Executor):
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.num_blocks = (runner.kv_cache.num_blocks,)
        self.block_size = runner.kv_cache.block_size

    def execute(self, plans: list[StepPlan]) -> list[list[SampleResult]]:
        return [self.runner.execute(plans[0])]

    def profile(self) -> dict:
        return {"steps": self.runner.steps, "control_s": 0.0, "attention": [self.runner.report()], "experts": []}
