"""Routed experts whose weights are reordered once, per expert, into oneDNN's blocked layout (CPU).

The CPU grouped GEMM walks the experts with `torch.mm`, whose bf16 kernel reorders the expert's weight on every
call (as for the linear layers, `workers/packed_linear.py`). Reordered once after loading, an expert's bf16 GEMM at
1-64 rows takes about 20-40 instead of 30-60 us on an AVX512-BF16 machine, with the same result bits; in float32
(MKL's GEMM unpacked) the mini model's decode step gained a few percent more on top of the packed linear layers.
`pack_experts` swaps them in, or in float32 with AVX2 or AVX-512 the C grouped GEMM's `CpuExperts`, faster again.
"""

from __future__ import annotations

from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from workers.cpu_experts import CpuExperts
from workers.experts import Experts
from workers.packed_linear import bucket_rows, onednn_linear, replace_modules


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
        """x [N, D] sorted by local expert, tokens_per_expert [E_local] -> [N, D] (as `Experts`).

        Each expert's rows are padded to their bucket (`bucket_rows`) once, in one buffer, and its GEMMs' outputs
        joined by one cat: a few ops per expert, not a pad and a copy for each of its two GEMMs."""
        counts = tokens_per_expert.tolist()
        if not any(counts):
            return x.new_empty(x.shape)
        rows = [bucket_rows(n) for n in counts]  # each expert's rows, padded to its kernel's row count
        starts = list(accumulate(rows, initial=0))  # each expert's first row among the padded ones
        dest = None
        if rows != counts:
            shift = [p - s for p, s in zip(starts, accumulate(counts, initial=0))][:-1]  # [E]
            dest = torch.arange(x.shape[0], device=x.device) + torch.tensor(shift, device=x.device).repeat_interleave(
                tokens_per_expert.to(x.device))  # [N]: each row's place among the padded rows
            x = x.new_zeros(sum(rows), x.shape[1]).index_copy_(0, dest, x)  # [P, D], zero rows where padded
        groups = [(e, start, n) for e, (start, n) in enumerate(zip(starts, rows)) if n]
        gate_up = torch.cat([onednn_linear(x[start : start + n], self.w13[e]) for e, start, n in groups])  # [P, 2I]
        gate, up = gate_up.split(self.intermediate, dim=-1)
        hidden = F.silu(gate) * up  # [P, I]; padded rows stay zero
        out = torch.cat([onednn_linear(hidden[start : start + n], self.w2[e]) for e, start, n in groups])  # [P, D]
        return out if dest is None else out[dest]  # [N, D]


def pack_experts(model: nn.Module) -> int:
    """Replaces each Experts module of the loaded model by a CpuExperts where its kernel fits (float32 with AVX2 or
    AVX-512), else by a PackedExperts; returns how many."""
    return replace_modules(model, lambda m: isinstance(m, Experts), lambda m: CpuExperts.build(m) or PackedExperts(m))
