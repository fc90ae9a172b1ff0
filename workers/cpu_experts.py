"""CpuExperts: the routed experts in float32 on x86 CPUs with AVX2 and FMA or AVX-512, through a C grouped GEMM.

oneDNN splits each expert's small GEMM over the threads (at decode, 10-30 rows an expert), and on two cores ran it
barely faster than on one: the mini model's 20-row expert GEMMs at 57-68 GFLOP/s on two threads, 55 on one. The
kernel (`csrc/grouped_gemm_f32.c`) gives each thread whole (expert, 16-output panel) items instead, from all the
experts at once, and needs no padding to row buckets: one call per projection, not one per expert. At the mini
model's decode shapes (256 rows over 16 experts, 512 x 512 and 512 x 256) it ran 2.1-2.4x faster than the oneDNN
loop it replaces (`PackedExperts`), and at 8192 rows no slower. Each output is its k-ordered sum of FMAs: float32
rounding apart from oneDNN's, not bit-equal.

The weights are cut into panels once, at build time (`cpu_grouped_gemm.py`). `CpuExperts.build` returns None where
the CPU, the compiler or the widths do not fit; MOE_SERVE_CPU_EXPERT_KERNEL=0 turns it off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from workers.cpu_grouped_gemm import PANEL, CpuGroupedGemm, pack_panels
from workers.experts import Experts


class CpuExperts(nn.Module):
    def __init__(self, experts: Experts, gemm: CpuGroupedGemm):
        super().__init__()
        self.gemm = gemm
        self.expert_ids = experts.expert_ids
        self.intermediate = experts.intermediate
        self.w13 = pack_panels(experts.w13.detach())  # [E_local, 2I / PANEL, D, PANEL]
        self.w2 = pack_panels(experts.w2.detach())  # [E_local, D / PANEL, I, PANEL]

    @classmethod
    def build(cls, experts: Experts) -> CpuExperts | None:
        """A CpuExperts of these experts where the kernel fits them and this machine; else None."""
        if os.environ.get("MOE_SERVE_CPU_EXPERT_KERNEL") == "0" or experts.w13.dtype != torch.float32:
            return None
        if experts.w13.device.type != "cpu" or experts.w13.shape[1] % PANEL or experts.w2.shape[1] % PANEL:
            return None
        gemm = CpuGroupedGemm.load()
        return None if gemm is None else cls(experts, gemm)

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x [N, D] sorted by local expert, tokens_per_expert [E_local] -> [N, D] (as `Experts`)."""
        offsets = F.pad(tokens_per_expert.to("cpu", torch.int64).cumsum(0), (1, 0))  # [E + 1]
        gate_up = self.gemm(x, self.w13, offsets)  # [N, 2I]
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.gemm(F.silu(gate) * up, self.w2, offsets)  # [N, D]
