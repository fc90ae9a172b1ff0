"""ParallelGroups: the process groups one worker takes part in, built once and passed down explicitly.

Ranks 0..A-1 are the attention workers and A..A+E-1 the expert workers; `ep` joins them all for the MoE
all-to-all, `attention` joins the attention ranks only. NCCL on CUDA, gloo on CPU; nothing else differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroups:
    ep: Any  # ProcessGroup over every rank: attention <-> expert all-to-all
    attention: Any  # ProcessGroup over the attention ranks (None on an expert rank)
    rank: int  # this process's rank in ep
    world: int
    attention_ranks: tuple[int, ...]
    expert_ranks: tuple[int, ...]

    @property
    def is_attention(self) -> bool:
        return self.rank in self.attention_ranks


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_parallel_groups(rank: int, num_attention: int, num_expert: int, init_method: str, device: torch.device,
                         timeout_s: float = 600.0) -> ParallelGroups:
    """Joins the rendezvous at init_method (tcp://host:port) and builds the groups; every rank calls this."""
    world = num_attention + num_expert
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    attention_ranks = tuple(range(num_attention))
    expert_ranks = tuple(range(num_attention, world))
    ep = dist.new_group(list(range(world)))
    attention = dist.new_group(list(attention_ranks))  # every rank must call new_group, members or not
    return ParallelGroups(ep, attention if rank in attention_ranks else None, rank, world, attention_ranks,
                          expert_ranks)


def single_rank_groups(init_method: str, device: torch.device) -> ParallelGroups:
    """One process that is both the attention and the expert side: the all-to-all path with world size 1."""
    dist.init_process_group(backend_for(device), init_method=init_method, rank=0, world_size=1)
    ep = dist.new_group([0])
    return ParallelGroups(ep, ep, 0, 1, (0,), (0,))
