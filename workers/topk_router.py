"""TopKRouter: DeepSeek-V2's softmax gate with greedy or group-limited greedy expert choice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.config import ModelConfig


class TopKRouter(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.method = config.topk_method
        self.n_group, self.topk_group = config.n_group, config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights [T, K] float32, expert ids [T, K])."""
        scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1)  # [T, E]
        if self.method == "group_limited_greedy":
            T = scores.shape[0]
            grouped = scores.view(T, self.n_group, self.num_experts // self.n_group)  # [T, G, E/G]
            best_groups = grouped.max(dim=-1).values.topk(self.topk_group, dim=-1).indices  # [T, topk_group]
            keep = torch.zeros(T, self.n_group, dtype=torch.bool, device=x.device)
            keep.scatter_(1, best_groups, True)
            scores = grouped.masked_fill(~keep[:, :, None], 0.0).view(T, self.num_experts)  # [T, E]
        weights, ids = scores.topk(self.top_k, dim=-1)  # [T, K]
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            weights = weights * self.routed_scaling_factor
        return weights, ids
