"""Fused linear layers whose parameters know how to take their slice of a checkpoint.

A parameter may carry `weight_loader(param, ref, shard)` and `shards` (the shard keys it expects); the generic
loader (`workers/loader.py`) calls them, and `ref.read_into(view)` reads the checkpoint bytes straight into the slice.
"""

from __future__ import annotations

import torch
from torch import nn


def load_rows(param: torch.Tensor, ref, offsets: dict, shard) -> None:
    start, size = offsets[shard]
    if ref.shape[0] != size:
        raise ValueError(f"{ref.name}: {tuple(ref.shape)} does not fit rows {start}:{start + size} of {tuple(param.shape)}")
    ref.read_into(param.data[start : start + size])


class MergedLinear(nn.Linear):
    """Several projections of the same input stacked on the output dim, e.g. gate_proj and up_proj."""

    def __init__(self, in_features: int, sizes: dict, bias: bool = False):
        super().__init__(in_features, sum(sizes.values()), bias=bias)
        offsets, start = {}, 0
        for key, size in sizes.items():
            offsets[key], start = (start, size), start + size
        for p in self.parameters():
            p.shards = tuple(sizes)
            p.weight_loader = lambda param, ref, shard: load_rows(param, ref, offsets, shard)


class QKVLinear(MergedLinear):
    def __init__(self, hidden: int, head_dim: int, heads: int, kv_heads: int, bias: bool = False):
        super().__init__(hidden, {"q": heads * head_dim, "k": kv_heads * head_dim, "v": kv_heads * head_dim}, bias)
