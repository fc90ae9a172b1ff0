"""KvBProjection: MLA's kv_b_proj, which takes a cached latent c_kv [L] up to every head's key (no-rope part) [N] and
value [V], in its three uses: prefill expands cached latents into keys and values (`forward`); the absorbed decode
folds W_UK into the queries (`absorb`) and applies W_UV to the attention's latent output (`expand`), as batched
matmuls over the heads.

Its rows are kept grouped as [all heads' W_UK | all heads' W_UV] (the checkpoint interleaves them per head), so each
half is one contiguous [H, *, L] batch for the decode bmms. On x86 CPUs in float32, `pack_kv_b` swaps in
`CpuKvBProjection`, whose decode halves run through the C grouped GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KvBProjection(nn.Module):
    def __init__(self, heads: int, nope_dim: int, v_dim: int, latent_dim: int):
        super().__init__()
        self.heads, self.nope_dim, self.v_dim, self.latent_dim = heads, nope_dim, v_dim, latent_dim
        self.weight = nn.Parameter(torch.empty(heads * (nope_dim + v_dim), latent_dim))  # [H*N + H*V, L]
        self.weight.weight_loader = self._load

    def halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, N, L] and W_UV [H, V, L], views of the weight."""
        H, N, w = self.heads, self.nope_dim, self.weight
        return w[: H * N].view(H, N, -1), w[H * N :].view(H, self.v_dim, -1)

    def _load(self, param: torch.Tensor, ref, shard) -> None:
        """The checkpoint's rows, per head [W_UK_h; W_UV_h], regrouped as [W_UK of every head; W_UV of every head]."""
        rows = torch.empty_like(param.data)
        ref.read_into(rows)
        rows = rows.view(self.heads, self.nope_dim + self.v_dim, -1)  # [H, N+V, L]
        w_uk, w_uv = self.halves()
        w_uk.data.copy_(rows[:, : self.nope_dim])
        w_uv.data.copy_(rows[:, self.nope_dim :])

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """Latents [C, L] -> every head's key and value parts [C, H*N + H*V]."""
        return F.linear(latent, self.weight)

    def absorb(self, q_nope: torch.Tensor) -> torch.Tensor:
        """Queries [B, H, N] -> their latent form [H, B, L] (head-major, as the decode attention reads it)."""
        w_uk, _ = self.halves()
        return torch.bmm(q_nope.transpose(0, 1), w_uk)  # [H, B, L]

    def expand(self, o_latent: torch.Tensor) -> torch.Tensor:
        """The attention's latent output [H, B, L] -> each head's value-space output [B, H, V]."""
        _, w_uv = self.halves()
        return torch.bmm(o_latent, w_uv.transpose(1, 2)).transpose(0, 1)  # [B, H, V]
