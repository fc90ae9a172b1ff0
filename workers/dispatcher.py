"""Dispatcher: the one interface MoE communication goes through.

dispatch sends each token's hidden state to the experts it chose, combine brings the expert outputs back and
weighs them. Both are split into start/wait so that a caller can overlap the wait with other compute; what combine
needs travels in the payload's handle, never on the dispatcher.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class DispatchOutput(NamedTuple):
    hidden: torch.Tensor  # [N, D] token copies for this rank's experts, sorted by local expert
    tokens_per_expert: torch.Tensor  # [E_local]
    handle: Any  # what combine needs to route results back


class Dispatcher:
    def for_layer(self, layer: int) -> "Dispatcher":
        """The dispatcher one MoE layer uses (a distributed one tags its rounds with the layer)."""
        return self

    def dispatch_start(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Any:
        raise NotImplementedError

    def dispatch_wait(self, pending: Any) -> DispatchOutput:
        raise NotImplementedError

    def combine_start(self, expert_out: torch.Tensor, handle: Any) -> Any:
        raise NotImplementedError

    def combine_wait(self, pending: Any) -> torch.Tensor:
        raise NotImplementedError

    def dispatch(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchOutput:
        return self.dispatch_wait(self.dispatch_start(hidden, topk_ids, topk_weights))

    def combine(self, expert_out: torch.Tensor, handle: Any) -> torch.Tensor:
        return self.combine_wait(self.combine_start(expert_out, handle))


def weighted_sum(rows: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Expert outputs back to their tokens: rows [T*K, D] in sorted order, order [T*K] the flat (token, k) index of
    each sorted row -> [T, D], the routing-weighted sum over each token's K experts (in k order, every topology)."""
    T, K = topk_weights.shape
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)  # [T*K] sorted row of each (token, k)
    unsorted = rows.index_select(0, inverse).view(T, K, rows.shape[1])  # [T, K, D]
    # one fp32 bmm ([1, K] x [K, D] per token) instead of a [T, K, D] product and a sum: 1.7 vs 4.2 ms alone for
    # 2048 tokens x 4 experts here
    return torch.bmm(topk_weights[:, None, :].float(), unsorted.float()).squeeze(1).to(rows.dtype)  # [T, D]
