"""RotaryEmbedding: default, linear and YaRN rope, in DeepSeek's interleaved or Llama's half-split layout."""

from __future__ import annotations

import math

import torch
from torch import nn

from workers.config import RopeConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(head_dim: int, rope: RopeConfig) -> float:
    """DeepSeek folds YaRN's mscale_all_dim into the softmax scale (squared: once for q, once for k)."""
    scale = head_dim**-0.5
    if rope.type == "yarn" and rope.mscale_all_dim:
        m = yarn_mscale(rope.factor, rope.mscale_all_dim)
        scale = scale * m * m
    return scale


def _yarn_inv_freq(dim: int, rope: RopeConfig) -> tuple[torch.Tensor, float]:
    base, factor = rope.theta, rope.factor
    omax = rope.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(omax / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rope.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rope.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 where the original (extrapolated) frequency is kept
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    if rope.attention_factor is not None:
        attention = float(rope.attention_factor)
    elif rope.mscale and rope.mscale_all_dim:
        attention = yarn_mscale(factor, rope.mscale) / yarn_mscale(factor, rope.mscale_all_dim)
    else:
        attention = yarn_mscale(factor)
    return inv_freq, attention


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, rope: RopeConfig, interleaved: bool):
        super().__init__()
        self.dim = dim
        self.interleaved = interleaved
        if rope.type == "yarn":
            inv_freq, self.attention_factor = _yarn_inv_freq(dim, rope)
        else:
            inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            if rope.type == "linear":
                inv_freq = inv_freq / rope.factor
            self.attention_factor = 1.0
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # [R/2]

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Computed once per forward and shared by every layer."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [T, R/2]
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, H, R]; rotation in float32, result in x's dtype."""
        xf = x.float()
        if self.interleaved:  # each pair (x[2i], x[2i+1]) turns as the complex number x[2i] + i x[2i+1]: one multiply
            if xf.storage_offset() % 2:  # a complex view starts on a whole pair of floats
                xf = xf.contiguous()
            pairs = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))  # [T, H, R/2]
            return torch.view_as_real(pairs * torch.complex(cos, sin)[:, None, :]).flatten(-2).to(x.dtype)
        cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, R/2]
        x0, x1 = xf.chunk(2, dim=-1)  # [T, H, R/2]
        return torch.cat((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).to(x.dtype)
