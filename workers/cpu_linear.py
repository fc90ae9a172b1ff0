"""CpuLinear: a float32 linear layer on x86 CPUs with AVX2 and FMA or AVX-512, through the C grouped GEMM as one group.

oneDNN's packed float32 linear (`PackedLinear`) splits a GEMM's outputs over the threads in fixed shares. The
grouped GEMM's items (16 outputs of a chunk of rows each) are taken by the threads as they go, and no rows are
padded. On the 2-core Zen 3 machine, over a pass through 32 distinct layers of the mini model's shapes (their
weights read from memory, as in a step), it took 23% less time than oneDNN at 1 row, 16-18% less at 4-32 rows, the
same at 64 and 256, and ~4% more at 2048 (a prefill's rows). In the engine, with the two forms switched every 4
steps in one process (`benchmarks/cpu_kernel_forms.py`), the decode step was 10-13% shorter at batch 1 and 4-9% at
batch 16, the same at 64 (within 1-4%), and a prefill of 64 prompts the same (within 2%). Each output is its
k-ordered sum of FMAs: float32 rounding apart from oneDNN's, not bit-equal.

`CpuLinear.build` returns None where the dtype, device, widths (outputs a multiple of PANEL, inputs), CPU or compiler
do not fit; MOE_SERVE_CPU_LINEAR_KERNEL=0 turns it off. `pack_linears` then uses a PackedLinear.
"""

from __future__ import annotations

import functools
import os

import torch
from torch import nn

from workers.cpu_grouped_gemm import PANEL, CpuGroupedGemm, pack_panels


@functools.lru_cache(maxsize=64)
def one_group(rows: int) -> torch.Tensor:
    """The offsets (0, rows) of one group of `rows` rows: made once per row count (read only), not per call (~17 us
    a call, 21 calls a decode step of the mini model)."""
    return torch.tensor((0, rows))


class CpuLinear(nn.Module):
    def __init__(self, linear: nn.Linear, gemm: CpuGroupedGemm):
        super().__init__()
        self.gemm = gemm
        self.panels = pack_panels(linear.weight.detach()[None])  # [1, N / PANEL, K, PANEL]
        self.bias = linear.bias

    @classmethod
    def build(cls, linear: nn.Linear) -> CpuLinear | None:
        """A CpuLinear of this layer where the kernel fits it and this machine; else None."""
        w = linear.weight
        if os.environ.get("MOE_SERVE_CPU_LINEAR_KERNEL") == "0" or w.dtype != torch.float32:
            return None
        if w.device.type != "cpu" or w.shape[0] % PANEL or not w.shape[1]:
            return None
        gemm = CpuGroupedGemm.load()
        return None if gemm is None else cls(linear, gemm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [M, K]
        out = self.gemm(rows, self.panels, one_group(rows.shape[0]))  # [M, N]
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], out.shape[-1])  # [..., N]
