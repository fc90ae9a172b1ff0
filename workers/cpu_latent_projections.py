"""CpuLatentProjections: the absorbed MLA decode's W_UK and W_UV projections in float32 on x86 CPUs with AVX2 and
FMA, through the C grouped GEMM with a group per head.

Each head's projection is a small GEMM (the decode batch's rows, 128 x 512 or 512 x 128). The grouped GEMM shares
out the heads' (head, 16-output panel) items over the threads. A small gain: in the mini model's engine (float32,
2-core Zen 3), with the two forms switched every 4 steps in one process, the median decode step took 68.1 against
68.6 ms at batch 64 (63.8 against 65.4 in an earlier run), 25.5 against 26.6 ms at batch 16 and 13.5 against 13.8 ms
at batch 1. The panels are copies, cut at build time: kv_b_proj keeps its weight for the prefill's expansion, so
the layer holds its kv_b weight twice. MOE_SERVE_CPU_LINEAR_KERNEL=0 turns it off with the linear layers' kernel.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from workers.cpu_grouped_gemm import PANEL, CpuGroupedGemm, pack_panels
from workers.latent_projections import LatentProjections


class CpuLatentProjections:
    def __init__(self, w_uk: torch.Tensor, w_uv: torch.Tensor, gemm: CpuGroupedGemm):
        self.gemm = gemm
        self.uk = pack_panels(w_uk.detach().transpose(1, 2))  # [H, L / PANEL, N, PANEL]: q_nope [B, N] -> [B, L]
        self.uv = pack_panels(w_uv.detach())  # [H, V / PANEL, L, PANEL]: o_latent [B, L] -> [B, V]

    @classmethod
    def build(cls, weights: LatentProjections) -> CpuLatentProjections | None:
        """Of these projections' loaded weights, where the kernel fits them and this machine; else None."""
        w_uk, w_uv = weights.weights()  # [H, N, L], [H, V, L]
        if os.environ.get("MOE_SERVE_CPU_LINEAR_KERNEL") == "0" or w_uk.dtype != torch.float32:
            return None
        if w_uk.device.type != "cpu" or w_uk.shape[2] % PANEL or w_uv.shape[1] % PANEL:
            return None
        gemm = CpuGroupedGemm.load()
        return None if gemm is None else cls(w_uk, w_uv, gemm)

    def _per_head(self, x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
        """x [H, B, K] (contiguous: each head's rows one group) -> [H, B, out]."""
        H, B, K = x.shape
        offsets = torch.arange(0, (H + 1) * B, B)  # [H + 1]: head h's rows h*B .. (h+1)*B
        return self.gemm(x.reshape(H * B, K), panels, offsets).view(H, B, -1)

    def query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [B, H, N] -> q_latent [H, B, L]."""
        return self._per_head(q_nope.transpose(0, 1).contiguous(), self.uk)  # [H, B, L]

    def output(self, o_latent: torch.Tensor) -> torch.Tensor:
        """o_latent [H, B, L] -> [B, H, V]."""
        return self._per_head(o_latent.contiguous(), self.uv).transpose(0, 1)  # [B, H, V]


def pack_latent_projections(model: nn.Module) -> int:
    """Gives each MLA layer of the loaded model CpuLatentProjections where the kernel fits; returns how many."""
    count = 0
    for module in model.modules():
        projections = getattr(module, "latent_projections", None)
        if isinstance(projections, LatentProjections):
            packed = CpuLatentProjections.build(projections)
            if packed is not None:
                module.latent_projections = packed
                count += 1
    return count
