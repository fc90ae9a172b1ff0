"""MLAAttention: DeepSeek-V2 multi-head latent attention over a paged latent cache.

The cache holds, per token, the normalized latent c_kv [L] and the roped key k_pe [R]; keys and values are never
cached expanded. kv_b_proj (`KvBProjection`) takes the latents up to keys and values, or absorbs W_UK and W_UV into
the decode's queries and output. Prefill chunks expand their context through kv_b_proj (the "naive" form, see
tiled_attention): short ones together, up to the score budget's elements (fresh prompts of one length then attend in
one SDPA call), and a long one a tile at a time; decode uses the weight-absorbed form, scoring queries directly
against the latents and applying W_UV after attention. A step may mix both: its decode tokens come first in the flat
batch.
"""

from __future__ import annotations

import torch
from torch import nn

from workers.attention_metadata import AttentionMetadata, store
from workers.config import ModelConfig
from workers.kv_b_projection import KvBProjection
from workers.mla_decode import MLADecode, torch_mla_decode
from workers.rms_norm import RMSNorm
from workers.rotary_embedding import RotaryEmbedding, softmax_scale
from workers.tiled_attention import SCORE_BUDGET, causal_attention, fresh_runs, tiled_attention


class MLAAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, mla_decode: MLADecode = torch_mla_decode):
        super().__init__()
        D, H = config.hidden_size, config.num_attention_heads
        self.num_heads = H
        self.nope_dim, self.rope_dim, self.v_dim = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.latent_dim = config.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        if config.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=config.attention_bias)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = nn.Linear(config.q_lora_rank, H * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.latent_dim + self.rope_dim, bias=config.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.latent_dim, config.rms_norm_eps)
        self.kv_b_proj = KvBProjection(H, self.nope_dim, self.v_dim, self.latent_dim)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=config.attention_bias)
        self.rotary = rotary
        self.scale = softmax_scale(qk_dim, config.rope)
        self.absorb_decode = True
        self.mla_decode = mla_decode

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        T, H, L = x.shape[0], self.num_heads, self.latent_dim
        nd = meta.num_decodes if self.absorb_decode else 0
        q = self._query(x).view(T, H, self.nope_dim + self.rope_dim)  # [T, H, N+R]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)  # [T, H, N], [T, H, R]
        roped = self.rotary(q_pe, cos, sin)  # [T, H, R]
        q_pe[nd:] = roped[nd:]  # in place: the prefill rows of q are now [q_nope | roped q_pe]
        kv = self.kv_a_proj_with_mqa(x)  # [T, L+R]
        latent = self.kv_a_layernorm(kv[:, :L])  # [T, L]
        k_pe = self.rotary(kv[:, None, L:], cos, sin)[:, 0]  # [T, R]
        entries = torch.cat((latent, k_pe), dim=-1)  # [T, L+R]
        store(cache, meta.slot_mapping, entries)
        out = q_nope.new_empty(T, H, self.v_dim)  # [T, H, V]
        if nd:
            out[:nd] = self._decode_absorbed(q_nope[:nd], roped[:nd], cache, meta)
        for group in self._expansion_groups(list(meta.prefills(first=nd))):
            if len(group) == 1:  # expanded a tile at a time, however long
                i, start, qlen, clen = group[0]
                kv_tile = self._kv_tiles(meta.context(cache, i))
                out[start : start + qlen] = tiled_attention(q[start : start + qlen], kv_tile, clen, self.scale)
                continue
            # short contexts: one kv_b_proj for the whole group; a fresh prompt's context is its own new entries
            contexts = [entries[start : start + qlen] if qlen == clen else meta.context(cache, i)
                        for i, start, qlen, clen in group]  # each [C, L+R]
            k, v = self._kv_tiles(torch.cat(contexts))(0, sum(map(len, contexts)))  # [ΣC, H, N+R], [ΣC, H, V]
            first = 0  # the run's first row in k and v
            for run in fresh_runs(group, H):
                _, start, qlen, clen = run[0]
                n = len(run)
                if n > 1:  # fresh prompts of one length: one causal SDPA call for them all
                    rows, kv_rows = slice(start, start + n * qlen), slice(first, first + n * qlen)
                    out[rows] = causal_attention(q[rows], k[kv_rows], v[kv_rows], n, self.scale)
                else:
                    out[start : start + qlen] = tiled_attention(q[start : start + qlen], kv_slices(k, v, first), clen,
                                                                self.scale)
                first += n * clen
        return self.o_proj(out.flatten(1))  # [T, D]

    def _expansion_groups(self, prefills: list[tuple[int, int, int, int]]) -> list[list[tuple[int, int, int, int]]]:
        """Consecutive prefills whose contexts, expanded together, stay within the score budget's elements."""
        per_token = self.num_heads * (self.nope_dim + self.rope_dim + self.v_dim)  # expanded k and v elements
        groups, total = [], 0
        for p in prefills:
            clen = p[3]
            if groups and total + clen * per_token <= SCORE_BUDGET:
                groups[-1].append(p)
                total += clen * per_token
            else:
                groups.append([p])
                total = clen * per_token
        return groups

    def _kv_tiles(self, entries: torch.Tensor):
        """Expands a tile of cached latents [C, L+R] into keys [C, H, N+R] and values [C, H, V]."""
        H, L, N, R, V = self.num_heads, self.latent_dim, self.nope_dim, self.rope_dim, self.v_dim

        def tile(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
            C, e = stop - start, entries[start:stop]  # [C, L+R]
            kv = self.kv_b_proj(e[:, :L])  # [C, H*N + H*V]
            k = torch.cat((kv[:, : H * N].view(C, H, N), e[:, None, L:].expand(C, H, R)), dim=-1)  # [C, H, N+R]
            return k, kv[:, H * N :].view(C, H, V)

        return tile

    def _decode_absorbed(self, q_nope, q_pe, cache, meta: AttentionMetadata) -> torch.Tensor:
        """The query absorbed into the latent ([q_latent | q_pe] scores the cached [c_kv | k_pe] directly), the
        attention over the latents, then W_UV."""
        q_latent = self.kv_b_proj.absorb(q_nope)  # [H, B, L]
        o_latent = self.mla_decode(q_latent, q_pe, cache, meta, self.scale)  # [H, B, L]
        return self.kv_b_proj.expand(o_latent)  # [B, H, V]


def kv_slices(k: torch.Tensor, v: torch.Tensor, first: int):
    """A KVTile over one sequence's rows, from `first` on, of keys and values expanded for several."""
    return lambda start, stop: (k[first + start : first + stop], v[first + start : first + stop])
