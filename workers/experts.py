"""Experts: the routed experts one process owns for one MoE layer, run as grouped GEMMs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from workers.config import ModelConfig
from workers.grouped_mm import GroupedMM, looped_grouped_mm

PROJ_SHARD = {"gate": 0, "up": 1}


class Experts(nn.Module):
    def __init__(self, config: ModelConfig, expert_ids: Sequence[int], grouped_mm: GroupedMM = looped_grouped_mm):
        super().__init__()
        D, I = config.hidden_size, config.moe_intermediate_size
        self.expert_ids = tuple(expert_ids)
        self.local_index = {e: i for i, e in enumerate(self.expert_ids)}
        self.intermediate = I
        self.grouped_mm = grouped_mm
        self.w13 = nn.Parameter(torch.empty(len(self.expert_ids), 2 * I, D))  # [E_local, gate|up, D]
        self.w2 = nn.Parameter(torch.empty(len(self.expert_ids), D, I))  # [E_local, D, I]
        self.w13.shards = tuple((e, p) for e in self.expert_ids for p in PROJ_SHARD)
        self.w2.shards = tuple((e, "down") for e in self.expert_ids)
        self.w13.weight_loader = self.w2.weight_loader = self._load
        self.w13.expert_ids = self.w2.expert_ids = self.expert_ids  # global id of each slice (random init)

    def _load(self, param: torch.Tensor, ref, shard) -> None:
        expert, proj = shard
        if expert not in self.local_index:
            return  # another worker's expert: never read
        dst = param.data[self.local_index[expert]]
        if proj in PROJ_SHARD:
            dst = dst[PROJ_SHARD[proj] * self.intermediate : (PROJ_SHARD[proj] + 1) * self.intermediate]
        if tuple(ref.shape) != tuple(dst.shape):
            raise ValueError(f"{ref.name}: shape {tuple(ref.shape)}, expected {tuple(dst.shape)}")
        ref.read_into(dst)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x [N, D] sorted by local expert, tokens_per_expert [E_local] -> [N, D]."""
        gate_up = self.grouped_mm(x, self.w13.transpose(1, 2), tokens_per_expert)  # [N, 2I]
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.grouped_mm(F.silu(gate) * up, self.w2.transpose(1, 2), tokens_per_expert)  # [N, D]
