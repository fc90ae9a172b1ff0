"""Routed experts whose weights are reordered once, per expert, into oneDNN's blocked layout (CPU).

The CPU grouped GEMM walks the experts with `torch.mm`, whose bf16 kernel reorders the expert's weight on every
call (as for the linear layers, `workers/packed_linear.py`). Reordered once after loading, an expert's bf16 GEMM at
1-64 rows takes about 20-40 instead of 30-60 us on an AVX512-BF16 machine, with the same result bits; in float32
(MKL's GEMM unpacked) the mini model's decode step gained a few percent more on top of the packed linear layers.
`pack_experts` swaps them in.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from workers.experts import Experts
from workers.packed_linear import packed_linear, replace_modules


class PackedExperts(nn.Module):
    def __init__(self, experts: Experts):
        super().__init__()
        reorder = torch.ops.mkldnn._reorder_linear_weight
        self.expert_ids = experts.expert_ids
        self.intermediate = experts.intermediate
        self.w13 = [reorder(w) for w in experts.w13.detach()]  # E_local × [gate|up, D], oneDNN layout
        self.w2 = [reorder(w) for w in experts.w2.detach()]  # E_local × [D, I], oneDNN layout

    @property
    def packed_weights(self) -> list[torch.Tensor]:
        """Each expert's reordered weights ([N, K] each), for `packed_linear.warm_up`."""
        return [*self.w13, *self.w2]

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x [N, D] sorted by local expert, tokens_per_expert [E_local] -> [N, D] (as `Experts`)."""
        counts = tokens_per_expert.tolist()
        groups = [(e, start, n) for e, (start, n) in enumerate(zip(accumulate(counts, initial=0), counts)) if n]
        gate_up = x.new_empty(x.shape[0], 2 * self.intermediate)  # [N, 2I]
        for e, start, n in groups:
            gate_up[start : start + n] = packed_linear(x[start : start + n], self.w13[e])
        gate, up = gate_up.split(self.intermediate, dim=-1)
        hidden = F.silu(gate) * up  # [N, I]
        out = x.new_empty(x.shape)  # [N, D]
        for e, start, n in groups:
            out[start : start + n] = packed_linear(hidden[start : start + n], self.w2[e])
        return out


def pack_experts(model: nn.Module) -> int:
    """Replaces each Experts module of the loaded model by a PackedExperts; returns how many."""
    return replace_modules(model, lambda m: isinstance(m, Experts), PackedExperts)
