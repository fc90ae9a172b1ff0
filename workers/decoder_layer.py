"""DecoderLayer: pre-norm attention and feed-forward with residuals, shared by both architectures."""

import torch
from torch import nn

from workers.attention_metadata import AttentionMetadata
from workers.rms_norm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, eps: float, self_attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = mlp

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, meta)  # [T, D]
        return x + self.mlp(self.post_attention_layernorm(x))  # [T, D]
