"""AttentionWorker: one data-parallel attention rank.

It holds everything but the routed experts: the embeddings, the attention layers and their KV cache, the dense
layers, each MoE layer's router gate and shared experts, the final norm, the lm_head and sampling. Its MoE
layers send tokens to the expert workers through the all-to-all dispatcher; with no expert workers it holds
the routed experts too (colocated, data parallel).
"""

from __future__ import annotations

import time

import torch.distributed as dist

from router.engine_config import EngineConfig
from workers.all_to_all_dispatcher import REPORT, STOP, AllToAllDispatcher, DispatchStats
from workers.config import ModelConfig, resolve_device
from workers.expert_placement import ExpertPlacement
from workers.model_runner import StepPlan, build_runner
from workers.parallel_groups import ParallelGroups
from workers.sampler import SampleResult


class AttentionWorker:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, groups: ParallelGroups,
                 placement: ExpertPlacement | None):
        self.groups = groups
        self.model_config = model_config
        self.dispatcher = None
        if placement is None:
            self.runner = build_runner(config, model_config)
        else:
            self.dispatcher = AllToAllDispatcher(groups, placement, resolve_device(config.device),
                                                 stats=DispatchStats(model_config.n_routed_experts))
            self.runner = build_runner(config, model_config, self.dispatcher, expert_ids=(),
                                       micro_batches=config.micro_batches)

    def info(self) -> dict:
        cache = self.runner.kv_cache
        return {"num_blocks": cache.num_blocks, "block_size": cache.block_size}

    def execute(self, plan: StepPlan) -> tuple[list[SampleResult], float]:
        """The plan's samples, and the seconds this worker spent on them."""
        t0 = time.perf_counter()
        results = self.runner.execute(plan)
        return results, time.perf_counter() - t0

    def report(self) -> dict:
        """This worker's time split; with expert workers, a REPORT round has them send theirs to the executor."""
        if self.dispatcher is not None:
            self._signal(REPORT)
        return self.runner.report()

    def stop(self) -> None:
        if self.dispatcher is not None:
            self._signal(STOP)
        dist.destroy_process_group()

    def _signal(self, code: int) -> None:
        c = self.model_config
        self.dispatcher.signal(code, c.hidden_size, c.num_experts_per_tok, self.runner.dtype)
