"""LatentProjections: the absorbed MLA decode's two per-head projections, into the latent through W_UK and out of it
through W_UV, as torch.bmm over views of kv_b_proj's weight (any device and dtype).

`MLAAttention` holds one; on a float32 CPU with AVX2, `pack_latent_projections` swaps in `CpuLatentProjections`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Weights = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> W_UK [H, N, L], W_UV [H, V, L]


class LatentProjections:
    def __init__(self, weights: Weights):
        self.weights = weights  # read at each call: views of the loaded kv_b_proj weight

    def query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [B, H, N] -> q_latent [H, B, L]."""
        w_uk, _ = self.weights()
        return torch.bmm(q_nope.transpose(0, 1), w_uk)  # [H, B, L]

    def output(self, o_latent: torch.Tensor) -> torch.Tensor:
        """o_latent [H, B, L] -> [B, H, V]."""
        _, w_uv = self.weights()
        return torch.bmm(o_latent, w_uv.transpose(1, 2)).transpose(0, 1)  # [B, H, V]
