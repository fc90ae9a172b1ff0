"""MoE: DeepSeekMoE's shared experts plus routed experts behind a dispatcher."""

from __future__ import annotations

import torch
from torch import nn

from workers.config import ModelConfig
from workers.dispatcher import Dispatcher
from workers.experts import Experts
from workers.mlp import MLP
from workers.topk_router import TopKRouter


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, experts: Experts, dispatcher: Dispatcher):
        super().__init__()
        self.gate = TopKRouter(config)
        self.shared_experts = (
            MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts, config.mlp_bias)
            if config.n_shared_experts else None
        )
        self.experts = experts
        self.dispatcher = dispatcher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.gate(x)  # [T, K], [T, K]
        sent = self.dispatcher.dispatch(x, topk_ids, topk_weights)
        out = self.dispatcher.combine(self.experts(sent.hidden, sent.tokens_per_expert), sent.handle)  # [T, D]
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
