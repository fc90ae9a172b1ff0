"""tiled_attention: causal prefill attention over a long cached context, one tile of keys at a time.

A chunk of Q new queries attends to its whole context (cached prefix plus itself). The context is visited in
tiles with an online softmax, so the scores never take more than H x Q x tile elements: attention memory is
O(chunk x tile), whatever the context length. A context that fits in one tile takes a single SDPA call.
Consecutive fresh prompts of one length (`fresh_runs`) need no cached context: `causal_attention` takes them
together, as one batch of one SDPA call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

SCORE_BUDGET = 1 << 24  # score elements per tile (64 MiB in float32)
MIN_TILE = 256

KVTile = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # (start, stop) -> k [C, KVH, Dk], v [C, KVH, Dv]


def tiled_attention(q: torch.Tensor, kv_tile: KVTile, context_len: int, scale: float) -> torch.Tensor:
    """q [Q, H, Dk], the last Q positions of a context of context_len; returns [Q, H, Dv]."""
    Q, H, Dk = q.shape
    offset = context_len - Q  # position of the first query
    tile = tile_len(Q, H)
    if context_len <= tile:
        k, v = kv_tile(0, context_len)
        return _sdpa(q, k, v, offset, scale)
    m = l = acc = None
    rows = torch.arange(Q, device=q.device)[:, None] + offset  # [Q, 1] query positions
    for start in range(0, context_len, tile):
        stop = min(start + tile, context_len)
        k, v = kv_tile(start, stop)  # [C, KVH, Dk], [C, KVH, Dv]
        KVH = k.shape[1]
        qg = q.permute(1, 0, 2).reshape(KVH, H // KVH, Q, Dk)  # [KVH, G, Q, Dk]; head h uses kv head h // G
        s = torch.matmul(qg, k.permute(1, 2, 0)[:, None]).float() * scale  # [KVH, G, Q, C]
        if stop - 1 > offset:  # some keys lie after some queries
            cols = torch.arange(start, stop, device=q.device)[None, :]  # [1, C]
            s = s.masked_fill(cols > rows, float("-inf"))
        tile_max = s.amax(dim=-1, keepdim=True)  # [KVH, G, Q, 1]
        m_new = tile_max if m is None else torch.maximum(m, tile_max)
        p = torch.exp(s - m_new)  # [KVH, G, Q, C]
        pv = torch.matmul(p.to(v.dtype), v.permute(1, 0, 2)[:, None]).float()  # [KVH, G, Q, Dv]
        if m is None:
            l, acc = p.sum(dim=-1, keepdim=True), pv
        else:
            corr = torch.exp(m - m_new)  # [KVH, G, Q, 1]
            l, acc = l * corr + p.sum(dim=-1, keepdim=True), acc * corr + pv
        m = m_new
    out = (acc / l).to(q.dtype)  # [KVH, G, Q, Dv]
    return out.reshape(H, Q, -1).permute(1, 0, 2)  # [Q, H, Dv]


def tile_len(query_len: int, heads: int) -> int:
    """Keys per tile for query_len queries of `heads` heads: a context up to this long takes one SDPA call."""
    return max(MIN_TILE, SCORE_BUDGET // (heads * query_len))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, scale: float) -> torch.Tensor:
    """n fresh prompts of one length S, back to back: q [n*S, H, Dk], k [n*S, KVH, Dk], v [n*S, KVH, Dv], each
    prompt's queries attending causally to its own keys, in one SDPA call over a batch of n; returns [n*S, H, Dv]."""
    S = q.shape[0] // n
    q, k, v = (t.unflatten(0, (n, S)) for t in (q, k, v))  # [n, S, *, D]
    return _sdpa(q, k, v, 0, scale).flatten(0, 1)


def fresh_runs(prefills: list[tuple[int, int, int, int]], heads: int) -> list[list[tuple[int, int, int, int]]]:
    """Prefills (i, start, query_len, context_len) in their order in the batch, each run of consecutive fresh
    prompts (no cached prefix: query_len == context_len) of one length together, for `causal_attention`; every
    other prefill alone. Only prompts that `tiled_attention` would take in one SDPA call anyway (no longer than a
    tile) run together: a longer one keeps its tiles, and the memory they bound."""
    runs: list[list[tuple[int, int, int, int]]] = []
    for p in prefills:
        qlen, clen = p[2], p[3]
        if runs and qlen == clen and runs[-1][0][2:] == (qlen, qlen) and qlen <= tile_len(qlen, heads):
            runs[-1].append(p)
        else:
            runs.append([p])
    return runs


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset: int, scale: float) -> torch.Tensor:
    """One SDPA call over [Q, H, Dk] queries and [C, KVH, D] keys and values (or a batch of them, [B, Q, H, Dk] and
    [B, C, KVH, D]) as 4-D inputs: torch's fused kernels take only 4-D inputs with one head dim (3-D, or MLA's
    192-wide keys with 128-wide values, fall to its unfused path, ~10x slower on CPU at 512 tokens). The narrower
    side is zero-padded, which changes no score and no output column; the padding is sliced off."""
    batched = q.dim() == 4
    if not batched:
        q, k, v = q[None], k[None], v[None]  # a batch of one
    Q, C, Dk, Dv = q.shape[1], k.shape[1], q.shape[-1], v.shape[-1]
    mask = None
    if offset:
        rows = torch.arange(Q, device=q.device)[:, None] + offset
        mask = torch.arange(C, device=q.device)[None, :] <= rows  # [Q, C]
    if Dv < Dk:
        v = F.pad(v, (0, Dk - Dv))  # [B, C, KVH, Dk]
    elif Dk < Dv:
        q, k = F.pad(q, (0, Dv - Dk)), F.pad(k, (0, Dv - Dk))  # [B, Q, H, Dv], [B, C, KVH, Dv]
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=mask is None and Q > 1, scale=scale, enable_gqa=k.shape[2] != q.shape[2],
    )  # [B, H, Q, max(Dk, Dv)]
    o = o[..., :Dv].transpose(1, 2)  # [B, Q, H, Dv]
    return o if batched else o[0]
