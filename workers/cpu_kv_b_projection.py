"""CpuKvBProjection: MLA's kv_b_proj whose absorbed-decode halves run through the C grouped GEMM (float32 on x86 CPUs
with AVX2 and FMA or AVX-512), a group per head, the weights packed into panels once after loading.

torch's bmm (MKL) splits each head's small GEMM over the threads in fixed shares; the grouped GEMM lets the threads
take (head, panel) items as they go. On the 2-core Zen 3 machine, over the mini model's four layers of W_UK and
W_UV at 64 decode rows, it took 8.0 ms against the bmms' 9.8 (134 against 109 GFLOP/s), at 16 rows 2.6 against 3.2
ms. Prefill's expansion (`forward`) stays on the weight as it is. The packed halves hold a second copy of the
weight's values.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from workers.cpu_grouped_gemm import PANEL, CpuGroupedGemm, pack_panels
from workers.kv_b_projection import KvBProjection
from workers.packed_linear import replace_modules


class CpuKvBProjection(KvBProjection):
    def __init__(self, proj: KvBProjection, gemm: CpuGroupedGemm):
        nn.Module.__init__(self)
        self.heads, self.nope_dim, self.v_dim, self.latent_dim = proj.heads, proj.nope_dim, proj.v_dim, proj.latent_dim
        self.weight = proj.weight
        self.gemm = gemm
        w_uk, w_uv = proj.halves()
        self.uk_panels = pack_panels(w_uk.detach().transpose(1, 2))  # [H, L / PANEL, N, PANEL]
        self.uv_panels = pack_panels(w_uv.detach())  # [H, V / PANEL, L, PANEL]

    @classmethod
    def build(cls, proj: KvBProjection) -> CpuKvBProjection | None:
        """The packed form of this projection where the kernel fits it and this machine; else None.
        MOE_SERVE_CPU_LINEAR_KERNEL=0 turns it off with the linear layers'."""
        w = proj.weight
        if os.environ.get("MOE_SERVE_CPU_LINEAR_KERNEL") == "0" or w.dtype != torch.float32 or w.device.type != "cpu":
            return None
        if proj.latent_dim % PANEL or proj.v_dim % PANEL or not proj.nope_dim:  # the outputs of W_UK and W_UV
            return None
        gemm = CpuGroupedGemm.load()
        return None if gemm is None else cls(proj, gemm)

    def _by_head(self, rows: int) -> torch.Tensor:
        return torch.arange(self.heads + 1) * rows  # [H + 1]: head h's rows are h*rows .. (h+1)*rows

    def absorb(self, q_nope: torch.Tensor) -> torch.Tensor:
        B, H, N = q_nope.shape
        x = q_nope.transpose(0, 1).reshape(H * B, N)  # [H*B, N], head-major
        return self.gemm(x, self.uk_panels, self._by_head(B)).view(H, B, self.latent_dim)  # [H, B, L]

    def expand(self, o_latent: torch.Tensor) -> torch.Tensor:
        H, B, L = o_latent.shape
        out = self.gemm(o_latent.reshape(H * B, L), self.uv_panels, self._by_head(B))  # [H*B, V]
        return out.view(H, B, self.v_dim).transpose(0, 1)  # [B, H, V]


def pack_kv_b(model: nn.Module) -> int:
    """Replaces each KvBProjection of the loaded model by a CpuKvBProjection where the C kernel takes it (float32
    with AVX2 or AVX-512); returns how many. Elsewhere the decode keeps torch's bmms."""
    return replace_modules(model, lambda m: type(m) is KvBProjection, CpuKvBProjection.build)
