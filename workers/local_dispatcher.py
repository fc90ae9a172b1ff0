"""LocalDispatcher: the colocated case, where every expert lives in this process."""

from __future__ import annotations

from typing import NamedTuple

import torch

from workers.all_to_all_dispatcher import DispatchStats
from workers.dispatcher import Dispatcher, DispatchOutput, weighted_sum


class LocalHandle(NamedTuple):
    order: torch.Tensor  # [T*K] position in the flat (token, k) list of each sorted row
    topk_weights: torch.Tensor  # [T, K]


class LocalDispatcher(Dispatcher):
    def __init__(self, num_experts: int, layer: int = 0, stats: DispatchStats | None = None):
        self.num_experts = num_experts
        self.layer = layer
        self.stats = stats or DispatchStats(num_experts)  # tokens routed to each expert (kept on the device)

    def for_layer(self, layer: int) -> "LocalDispatcher":
        return LocalDispatcher(self.num_experts, layer, self.stats)

    def dispatch_start(self, hidden, topk_ids, topk_weights) -> DispatchOutput:
        K = topk_ids.shape[1]
        flat = topk_ids.flatten()  # [T*K]
        order = flat.argsort(stable=True)  # [T*K]
        counts = flat.new_zeros(self.num_experts).index_add_(0, flat, torch.ones_like(flat))  # [E] (no sync)
        self.stats.add(self.stats.sent, self.layer, None, self._counted(topk_ids, counts))
        return DispatchOutput(hidden[order // K], counts, LocalHandle(order, topk_weights))

    def _counted(self, topk_ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The copies the stats count [E]: all of them, or those of the rows `stats.counted_rows` marks."""
        rows = self.stats.counted_rows
        if rows is None:
            return counts
        T, K = topk_ids.shape
        weights = rows[:T, None].expand(T, K).flatten()  # [T*K] 1 for a real row's copies, 0 for padding's
        return counts.new_zeros(self.num_experts).index_add_(0, topk_ids.flatten(), weights)  # [E]

    def dispatch_wait(self, pending: DispatchOutput) -> DispatchOutput:
        return pending

    def combine_start(self, expert_out: torch.Tensor, handle: LocalHandle) -> torch.Tensor:
        return weighted_sum(expert_out, handle.order, handle.topk_weights)  # [T, D]

    def combine_wait(self, pending: torch.Tensor) -> torch.Tensor:
        return pending
