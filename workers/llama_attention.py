"""LlamaAttention: MHA, GQA and MQA over a paged K/V cache (dense DeepSeek-Coder).

A prefill chunk attends to its context read back from the cache (`tiled_attention`), except that consecutive fresh
prompts of one length attend together, over the step's own keys and values, in one SDPA call; decode queries score
their gathered contexts in two matmuls.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.attention_metadata import AttentionMetadata, store
from workers.config import ModelConfig
from workers.linear import QKVLinear
from workers.rotary_embedding import RotaryEmbedding
from workers.tiled_attention import causal_attention, fresh_runs, tiled_attention


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.qkv_proj = QKVLinear(config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads,
                                  bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        self.rotary = rotary
        self.scale = self.head_dim**-0.5

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        T, H, KV, Dh = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * Dh, KV * Dh, KV * Dh], dim=-1)
        q = self.rotary(q.view(T, H, Dh), cos, sin)  # [T, H, Dh]
        k = self.rotary(k.view(T, KV, Dh), cos, sin)  # [T, KV, Dh]
        v = v.view(T, KV, Dh)
        store(cache, meta.slot_mapping, torch.stack((k, v), dim=1))  # cache [N, bs, 2, KV, Dh]
        nd = meta.num_decodes
        out = torch.empty_like(q)  # [T, H, Dh]
        if nd:
            out[:nd] = self._decode(q[:nd], cache, meta)
        for run in fresh_runs(list(meta.prefills()), H):
            i, start, qlen, clen = run[0]
            if len(run) > 1:  # fresh prompts of one length: their own new keys and values, one causal SDPA call
                rows = slice(start, start + len(run) * qlen)
                out[rows] = causal_attention(q[rows], k[rows], v[rows], len(run), self.scale)
            else:
                out[start : start + qlen] = tiled_attention(q[start : start + qlen],
                                                            self._kv_tiles(meta.context(cache, i)), clen, self.scale)
        return self.o_proj(out.flatten(1))  # [T, D]

    def _decode(self, q, cache, meta: AttentionMetadata) -> torch.Tensor:
        B, H, KV, Dh = q.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        entries, valid = meta.decode_context(cache)  # [B, S, 2, KV, Dh], [B, S]
        k, v = entries[:, :, 0].transpose(1, 2), entries[:, :, 1].transpose(1, 2)  # [B, KV, S, Dh]
        qg = q.view(B, KV, H // KV, Dh)  # [B, KV, G, Dh]
        scores = torch.matmul(qg, k.transpose(2, 3)).float() * self.scale  # [B, KV, G, S]
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)  # [B, KV, G, Dh]
        return out.view(B, H, Dh)

    @staticmethod
    def _kv_tiles(entries: torch.Tensor):
        """A tile of the cached context [C, 2, KV, Dh] as keys and values [C, KV, Dh]."""
        return lambda start, stop: (entries[start:stop, 0], entries[start:stop, 1])
