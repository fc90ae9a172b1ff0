"""ExpertShard: the routed experts of every MoE layer that one expert worker owns, and nothing else.

Parameter names match the checkpoint's (`model.layers.{i}.mlp.experts.w13`), so the generic loader reads exactly
this worker's expert tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from workers.causal_lm import weight_target
from workers.config import ModelConfig
from workers.experts import Experts
from workers.grouped_mm import GroupedMM, looped_grouped_mm


class ExpertShard(nn.Module):
    def __init__(self, config: ModelConfig, expert_ids: Sequence[int], grouped_mm: GroupedMM = looped_grouped_mm):
        super().__init__()
        self.config = config
        self.expert_ids = tuple(expert_ids)
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict()
        for i in config.moe_layers:
            layer = nn.Module()
            layer.mlp = nn.Module()
            layer.mlp.experts = Experts(config, self.expert_ids, grouped_mm)
            self.model.layers[str(i)] = layer

    def experts(self, layer: int) -> nn.Module:  # Experts, or PackedExperts once packed
        return self.model.layers[str(layer)].mlp.experts

    def weight_target(self, name: str) -> tuple[str, object]:
        return weight_target(self.config.architecture, name)
