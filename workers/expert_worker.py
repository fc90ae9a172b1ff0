"""ExpertWorker: owns a set of routed experts for every MoE layer, and serves all-to-all rounds until told to stop.

It loads only its own experts' weights. Each round's count exchange tells it which layer the tokens are for (or
a control code); it runs that layer's experts as grouped GEMMs and sends the results back, keeping the combine in
flight while it waits for the next round.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from router.engine_config import EngineConfig
from workers.all_to_all_dispatcher import REPORT, STOP, AllToAllDispatcher, DispatchStats
from workers.checkpoint import Checkpoint
from workers.config import ModelConfig, resolve_device, resolve_dtype
from workers.expert_placement import ExpertPlacement
from workers.expert_shard import ExpertShard
from workers.grouped_mm import select_grouped_mm
from workers.loader import build_model
from workers.packed_experts import pack_experts
from workers.packed_linear import packing_helps, warm_up
from workers.parallel_groups import ParallelGroups


class ExpertWorker:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, groups: ParallelGroups,
                 placement: ExpertPlacement):
        device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, device)
        self.index = groups.expert_ranks.index(groups.rank)
        self.expert_ids = placement.experts_of(self.index)
        checkpoint = None if config.random_weights else Checkpoint(Path(config.model))
        self.shard = build_model(ExpertShard, model_config, device, self.dtype, checkpoint, seed=config.seed,
                                 expert_ids=self.expert_ids, grouped_mm=select_grouped_mm(device, self.dtype))
        if packing_helps(device, self.dtype):
            pack_experts(self.shard)
            warm_up(self.shard, config.max_num_batched_tokens)  # an expert's rows: at most a step's tokens
        self.dispatcher = AllToAllDispatcher(groups, placement, device,
                                             stats=DispatchStats(model_config.n_routed_experts))
        self.empty = torch.empty(0, model_config.hidden_size, dtype=self.dtype, device=device)  # [0, D]
        self.no_ids = torch.empty(0, model_config.num_experts_per_tok, dtype=torch.long, device=device)  # [0, K]
        self.no_weights = torch.empty(0, model_config.num_experts_per_tok, device=device)  # [0, K]
        self.rounds = 0
        self.compute_s = 0.0  # running experts
        self.wait_s = 0.0  # waiting for the next round's tokens

    def info(self) -> dict:
        return {"experts": list(self.expert_ids)}

    @torch.inference_mode()
    def serve(self, report) -> None:
        """Rounds until STOP; on REPORT, calls report(self.stats()) (the executor reads it)."""
        pending = None
        while True:
            t0 = time.perf_counter()
            sent = self.dispatcher.dispatch(self.empty, self.no_ids, self.no_weights)
            t1 = time.perf_counter()
            self.wait_s += t1 - t0
            layer = sent.handle.layer
            if layer < 0:  # a control round: complete it, then act
                self.dispatcher.combine(sent.hidden, sent.handle)
                if layer == REPORT:
                    report(self.stats())
                if layer == STOP:
                    break
                continue
            out = self.shard.experts(layer)(sent.hidden, sent.tokens_per_expert)  # [N, D]
            self.compute_s += time.perf_counter() - t1
            self.rounds += 1
            if pending is not None:
                self.dispatcher.combine_wait(pending)
            pending = self.dispatcher.combine_start(out, sent.handle)
        if pending is not None:
            self.dispatcher.combine_wait(pending)
        dist.destroy_process_group()

    def stats(self) -> dict:
        return {"experts": list(self.expert_ids), "rounds": self.rounds, "compute_s": self.compute_s,
                "wait_s": self.wait_s, **self.dispatcher.stats.as_dict()}
