"""DecoderLayer: pre-norm attention and feed-forward with residuals, shared by both architectures."""

from collections.abc import Generator

import torch
from torch import nn

from workers.attention_metadata import AttentionMetadata
from workers.moe import MoE
from workers.rms_norm import RMSNorm


class DecoderLayer(nn.Module):
    def __init__(self, hidden: int, eps: float, self_attn: nn.Module, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(hidden, eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = mlp

    def stages(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
               meta: AttentionMetadata) -> Generator[None, None, torch.Tensor]:
        """The layer as a generator: a MoE layer yields once its tokens are off to the experts."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, meta)  # [T, D]
        h = self.post_attention_layernorm(x)  # [T, D]
        if isinstance(self.mlp, MoE):
            pending = self.mlp.start(h)
            yield
            return x + self.mlp.finish(pending)  # [T, D]
        return x + self.mlp(h)  # [T, D]
