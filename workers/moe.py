"""MoE: DeepSeekMoE's shared experts plus routed experts behind a dispatcher.

`start` routes and sends the tokens off, `finish` brings the routed experts' outputs back; between the two a
caller may run other work (another micro-batch's attention). The shared experts run in `finish`, before its wait.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from workers.config import ModelConfig
from workers.dispatcher import Dispatcher
from workers.experts import Experts
from workers.mlp import MLP
from workers.topk_router import TopKRouter


class MoEPending(NamedTuple):
    x: torch.Tensor  # [T, D] the layer's input, for the shared experts
    combine: Any  # the dispatcher's pending combine


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

    def start(self, x: torch.Tensor) -> MoEPending:
        topk_weights, topk_ids = self.gate(x)  # [T, K], [T, K]
        sent = self.dispatcher.dispatch(x, topk_ids, topk_weights)
        out = self.experts(sent.hidden, sent.tokens_per_expert)  # [N, D]: this process's experts' share
        return MoEPending(x, self.dispatcher.combine_start(out, sent.handle))

    def finish(self, pending: MoEPending) -> torch.Tensor:
        shared = self.shared_experts(pending.x) if self.shared_experts is not None else None  # [T, D]
        out = self.dispatcher.combine_wait(pending.combine)  # [T, D]
        return out if shared is None else out + shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self.start(x))
