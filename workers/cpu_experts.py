"""CpuExperts: the routed experts in float32 on x86 CPUs with AVX2 and FMA, through a C grouped GEMM.

oneDNN splits each expert's small GEMM over the threads (at decode, 10-30 rows an expert), and on two cores ran it
barely faster than on one: the mini model's 20-row expert GEMMs at 57-68 GFLOP/s on two threads, 55 on one. The
kernel (`csrc/grouped_gemm_f32.c`) gives each thread whole (expert, 16-output panel) items instead, from all the
experts at once, and needs no padding to row buckets: one call per projection, not one per expert. At the mini
model's decode shapes (256 rows over 16 experts, 512 x 512 and 512 x 256) it ran 2.1-2.4x faster than the oneDNN
loop it replaces (`PackedExperts`), and at 8192 rows no slower. Each output is its k-ordered sum of FMAs: float32
rounding apart from oneDNN's, not bit-equal.

The weights are cut into panels once, at build time. `CpuExperts.build` returns None where the CPU, the compiler or
the widths do not fit; MOE_SERVE_CPU_EXPERT_KERNEL=0 turns it off.
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.nn.functional as F
from torch import nn

from workers.c_library import AVX2, CSRC, CLibrary
from workers.experts import Experts

LIBRARY = CLibrary(CSRC / "grouped_gemm_f32.c", AVX2, frozenset({"avx2", "fma"}))
PANEL = 16  # outputs per weight panel (the kernel's NR)
_P, _I = ctypes.c_void_p, ctypes.c_int64


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """[G, N, K] weights -> [G, N / PANEL, K, PANEL]: each group's outputs in panels of PANEL, a panel k-major."""
    G, N, K = w.shape
    return w.reshape(G, N // PANEL, PANEL, K).transpose(2, 3).contiguous()


class CpuExperts(nn.Module):
    def __init__(self, experts: Experts, lib: ctypes.CDLL):
        super().__init__()
        self.lib = lib
        lib.grouped_gemm.argtypes = [_P, _P, _I, _P, _I, _I, _P, _I]
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
        lib = LIBRARY.load("the CPU grouped GEMM kernel", "the experts run through oneDNN")
        return None if lib is None else cls(experts, lib)

    def grouped_gemm(self, x: torch.Tensor, panels: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x [T, K] sorted by expert, panels [E, N / PANEL, K, PANEL], offsets [E + 1] -> [T, N]."""
        E, P, K, _ = panels.shape
        if (x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[1] != K or offsets.shape != (E + 1,)
                or int(offsets[-1]) != x.shape[0]):  # the kernel would read out of bounds
            raise ValueError(f"grouped GEMM: float32 CPU rows [{int(offsets[-1])}, {K}] for {E} experts expected, "
                             f"not {x.dtype} {x.device.type} {list(x.shape)} with {offsets.shape[0] - 1} expert counts")
        x = x.contiguous()
        y = x.new_empty(x.shape[0], P * PANEL)  # [T, N]
        self.lib.grouped_gemm(x.data_ptr(), offsets.data_ptr(), E, panels.data_ptr(), K, P * PANEL, y.data_ptr(),
                              torch.get_num_threads())
        return y

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """x [N, D] sorted by local expert, tokens_per_expert [E_local] -> [N, D] (as `Experts`)."""
        offsets = F.pad(tokens_per_expert.to("cpu", torch.int64).cumsum(0), (1, 0))  # [E + 1]
        gate_up = self.grouped_gemm(x, self.w13, offsets)  # [N, 2I]
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return self.grouped_gemm(F.silu(gate) * up, self.w2, offsets)  # [N, D]
