"""WorkerStats: what each worker of an engine has done, for /metrics: the token copies routed to each expert and
each worker's steps and busy time, read from the executor's profile every few seconds."""

from __future__ import annotations

from typing import NamedTuple


class WorkerTime(NamedTuple):
    worker: str  # attention-<rank> or expert-<index>
    steps: int  # steps run (attention) or MoE rounds computed (experts)
    busy_s: float  # seconds spent on them
    step_s: float  # mean seconds per step since the previous reading (0 if none ran)


class WorkerStats(NamedTuple):
    expert_tokens: tuple[int, ...]  # token copies routed to each expert, over every MoE layer and attention rank
    workers: tuple[WorkerTime, ...]

    @classmethod
    def from_profile(cls, profile: dict, previous: "WorkerStats | None" = None) -> "WorkerStats":
        """profile: Executor.profile()'s {"attention": [...], "experts": [...]}; previous: the last reading."""
        rows = [row for rank in profile["attention"] for row in rank.get("sent", {}).values()]
        expert_tokens = [sum(column) for column in zip(*rows)]
        times = [(f"attention-{r}", a["steps"], a["busy_s"]) for r, a in enumerate(profile["attention"])]
        times += [(f"expert-{i}", e["rounds"], e["compute_s"]) for i, e in enumerate(profile["experts"])]
        before = {w.worker: w for w in previous.workers} if previous else {}
        workers = []
        for name, steps, busy in times:
            last = before.get(name, WorkerTime(name, 0, 0.0, 0.0))
            ran = steps - last.steps
            workers.append(WorkerTime(name, steps, busy, (busy - last.busy_s) / ran if ran > 0 else 0.0))
        return cls(tuple(expert_tokens), tuple(workers))
