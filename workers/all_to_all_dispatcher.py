"""AllToAllDispatcher: expert parallelism over torch.distributed, one code path for NCCL and gloo.

Every rank of the `ep` group takes part in every round, whether it has tokens or not: attention ranks send the
tokens of one MoE layer and own no experts, expert ranks send nothing and own experts (one process may be both:
the world-size-1 case). A round is three all-to-alls:

1. counts: each rank tells each other rank how many of its token copies go to each of that rank's experts, with
   a header, the layer's index (or a control code), from which expert ranks learn what is coming;
2. dispatch: `all_to_all_single` of the token copies, sorted by destination rank, then by expert;
3. combine: the expert outputs go back by the reverse all-to-all and are weighed on the token's own rank.

Routing weights never travel: the token's rank keeps them, and weighs the returning rows in k order, exactly as
the colocated `LocalDispatcher` does, so every topology computes the same numbers.
"""

from __future__ import annotations

import copy
import time
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from workers.dispatcher import Dispatcher, DispatchOutput, weighted_sum
from workers.expert_placement import ExpertPlacement
from workers.parallel_groups import ParallelGroups

NO_TOKENS = -1  # the header of a rank that sends no layer's tokens (an expert rank)
STOP = -2  # control: the expert ranks leave their loop
REPORT = -3  # control: the expert ranks report their statistics


class DispatchStats:
    """Cumulative: token copies routed to (sent) and computed by (received) each expert per MoE layer, and the
    seconds spent dispatching (count exchange, send, waiting for the copies) and combining (waiting for results)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.sent: dict[int, torch.Tensor] = {}  # layer -> [E] copies this rank sent
        self.received: dict[int, torch.Tensor] = {}  # layer -> [E] copies this rank's experts computed
        self.dispatch_s = 0.0
        self.combine_s = 0.0
        # [>= T] 1 for each row to count, 0 for a padding row (DecodeGraphs sets it for its padded passes); None
        # counts every row
        self.counted_rows: torch.Tensor | None = None

    def as_dict(self) -> dict:
        return {"dispatch_s": self.dispatch_s, "combine_s": self.combine_s,
                "sent": {layer: row.tolist() for layer, row in self.sent.items()},
                "received": {layer: row.tolist() for layer, row in self.received.items()}}

    def zero(self) -> None:
        """Counts back to 0, in place (captured CUDA graphs keep adding into these same tensors)."""
        for row in (*self.sent.values(), *self.received.values()):
            row.zero_()

    def add(self, table: dict[int, torch.Tensor], layer: int, experts: torch.Tensor | None,
            counts: torch.Tensor) -> None:
        row = table.get(layer)
        if row is None:
            row = table[layer] = counts.new_zeros(self.num_experts)  # [E], on counts' device (no sync)
        if experts is None:  # counts of every expert, in order
            row += counts
        else:
            row.index_add_(0, experts.to(row.device), counts)


class A2AHandle(NamedTuple):
    layer: int  # the round's header: a layer index, or a control code
    order: torch.Tensor  # [T*K] flat (token, k) index of each row sent, in send order
    topk_weights: torch.Tensor  # [T, K]
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank
    regroup: torch.Tensor  # [N] received row of each expert-sorted row
    sent_work: Any  # the dispatch all-to-all, done before combine returns


class PendingDispatch(NamedTuple):
    work: Any
    received: torch.Tensor  # [N, D], grouped by source rank, then expert
    tokens_per_expert: torch.Tensor  # [E_local]
    handle: A2AHandle


class PendingCombine(NamedTuple):
    work: Any
    returned: torch.Tensor  # [T*K, D] in send order
    handle: A2AHandle


class AllToAllDispatcher(Dispatcher):
    def __init__(self, groups: ParallelGroups, placement: ExpertPlacement, device: torch.device,
                 layer: int = NO_TOKENS, stats: DispatchStats | None = None):
        self.groups = groups
        self.layer = layer
        self.stats = stats or DispatchStats(len(placement.owner))
        self.device = device
        world = groups.world
        owner_rank = [groups.expert_ranks[w] for w in placement.owner]  # [E] rank of each expert
        slots = sorted(range(len(owner_rank)), key=lambda e: (owner_rank[e], e))  # experts, rank-major
        per_rank = [owner_rank.count(r) for r in range(world)]
        self.max_local = max(per_rank)
        self.local_experts = torch.tensor([e for e in slots if owner_rank[e] == groups.rank], dtype=torch.long)
        self.num_local = len(self.local_experts)
        self.slot_experts = torch.tensor(slots, dtype=torch.long)  # [E] expert in each slot
        self.slot_of = torch.empty(len(slots), dtype=torch.long, device=device)  # [E] expert -> slot
        self.slot_of[torch.tensor(slots, device=device)] = torch.arange(len(slots), device=device)
        cell = []  # where each slot's count goes in the [world, max_local] count message
        for r in range(world):
            cell.extend(r * self.max_local + j for j in range(per_rank[r]))
        self.cell_of_slot = torch.tensor(cell, dtype=torch.long, device=device)  # [E]
        self.header_rank = groups.attention_ranks[0]

    def for_layer(self, layer: int) -> "AllToAllDispatcher":
        """This dispatcher for one MoE layer's rounds (the layer index is the header its rounds carry)."""
        twin = copy.copy(self)  # shares the tables and the stats
        twin.layer = layer
        return twin

    def dispatch_start(self, hidden, topk_ids, topk_weights) -> PendingDispatch:
        t0 = time.perf_counter()
        pending = self._round(hidden, topk_ids, topk_weights)
        self.stats.dispatch_s += time.perf_counter() - t0
        return pending

    def signal(self, code: int, hidden_size: int, top_k: int, dtype: torch.dtype) -> None:
        """A round with no tokens and a control header (STOP, REPORT), for the expert ranks."""
        empty = torch.empty(0, hidden_size, dtype=dtype, device=self.device)
        ids = torch.empty(0, top_k, dtype=torch.long, device=self.device)
        control = self.for_layer(code)
        sent = control.dispatch(empty, ids, torch.empty(0, top_k, device=self.device))
        control.combine(sent.hidden, sent.handle)

    def _round(self, hidden, topk_ids, topk_weights) -> PendingDispatch:
        T, K = topk_ids.shape
        world, group = self.groups.world, self.groups.ep
        slot = self.slot_of[topk_ids.flatten()]  # [T*K]
        order = slot.argsort(stable=True)  # [T*K] rows by destination rank, then expert
        per_slot = torch.bincount(slot, minlength=len(self.slot_of))  # [E]
        counts = per_slot.new_zeros(world * self.max_local)  # [R*M]
        counts[self.cell_of_slot] = per_slot
        headers = per_slot.new_full((world, 1), self.layer)  # [R, 1]
        message = torch.cat([headers, counts.view(world, self.max_local)], dim=1)  # [R, 1+M]
        heard = torch.empty_like(message)  # [R, 1+M] from each source: its header and counts for my experts
        dist.all_to_all_single(heard, message, group=group)
        local = heard[:, 1 : 1 + self.num_local]  # [R, E_local]
        send_splits = message[:, 1:].sum(dim=1).tolist()
        recv_splits = local.sum(dim=1).tolist()
        layer = int(heard[self.header_rank, 0])
        received = hidden.new_empty(sum(recv_splits), hidden.shape[1])  # [N, D]
        work = dist.all_to_all_single(received, hidden[order // K], recv_splits, send_splits, group=group,
                                      async_op=True)
        expert_of_row = torch.arange(self.num_local, device=self.device).repeat(world)  # [R*E_local]
        expert_of_row = expert_of_row.repeat_interleave(local.flatten())  # [N] local expert of each received row
        tokens_per_expert = local.sum(dim=0)  # [E_local]
        if T:
            self.stats.add(self.stats.sent, layer, self.slot_experts, per_slot)
        if self.num_local and layer >= 0:
            self.stats.add(self.stats.received, layer, self.local_experts, tokens_per_expert)
        handle = A2AHandle(layer, order, topk_weights, send_splits, recv_splits,
                           expert_of_row.argsort(stable=True), work)
        return PendingDispatch(work, received, tokens_per_expert, handle)

    def dispatch_wait(self, pending: PendingDispatch) -> DispatchOutput:
        t0 = time.perf_counter()
        pending.work.wait()
        self.stats.dispatch_s += time.perf_counter() - t0
        return DispatchOutput(pending.received[pending.handle.regroup], pending.tokens_per_expert, pending.handle)

    def combine_start(self, expert_out: torch.Tensor, handle: A2AHandle) -> PendingCombine:
        back = torch.empty_like(expert_out)  # [N, D] grouped by source rank again
        back[handle.regroup] = expert_out
        returned = expert_out.new_empty(len(handle.order), expert_out.shape[1])  # [T*K, D]
        work = dist.all_to_all_single(returned, back, handle.send_splits, handle.recv_splits, group=self.groups.ep,
                                      async_op=True)
        return PendingCombine(work, returned, handle)

    def combine_wait(self, pending: PendingCombine) -> torch.Tensor:
        t0 = time.perf_counter()
        pending.work.wait()
        pending.handle.sent_work.wait()
        self.stats.combine_s += time.perf_counter() - t0
        return weighted_sum(pending.returned, pending.handle.order, pending.handle.topk_weights)  # [T, D]
