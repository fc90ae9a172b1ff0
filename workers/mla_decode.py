"""MLA's absorbed decode attention over the paged latent cache, chosen once at build time for the device.

`mla_decode(q [B, H, L+R], cache [N, page, L+R], meta, scale, L) -> [B, H, L]`: each decode query
[q_latent | q_pe] scores its sequence's cached entries [c_kv | k_pe], and the softmax-weighted sum of the c_kv is
returned (W_UV is applied by the caller). On CUDA the Triton kernel reads the cache in place through the block
tables (`triton_mla_decode`); elsewhere the entries are gathered and scored with two bmms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from workers.attention_metadata import AttentionMetadata

log = logging.getLogger(__name__)

MLADecode = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, float, int], torch.Tensor]


def torch_mla_decode(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                     latent_dim: int) -> torch.Tensor:
    """Scores against the gathered entries in one bmm; the latents are also the values, so k_pe's columns are
    dropped after the second."""
    entries, valid = meta.decode_context(cache)  # [B, S, L+R], [B, S]
    scores = torch.bmm(q, entries.transpose(1, 2))  # [B, H, S]
    scores = (scores.float() * scale).masked_fill(~valid[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(entries.dtype)  # [B, H, S]
    return torch.bmm(probs, entries)[..., :latent_dim]  # [B, H, L]


def paged_mla_decode(q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                     latent_dim: int) -> torch.Tensor:
    from workers.triton_mla_decode import triton_mla_decode

    B = q.shape[0]
    return triton_mla_decode(q, cache, meta.block_tables[:B], meta.context_lens[:B], scale, latent_dim)


MIN_DOT_K = 16  # tl.dot's smallest inner dimension; the kernel's dots run over the latent and the rope widths


def kernel_takes(latent_dim: int, rope_dim: int) -> bool:
    """Widths the kernel compiles for: powers of two (tl.arange) of at least MIN_DOT_K."""
    return all(n >= MIN_DOT_K and n & (n - 1) == 0 for n in (latent_dim, rope_dim))


def select_mla_decode(device: torch.device, dtype: torch.dtype, latent_dim: int, rope_dim: int) -> MLADecode:
    """The Triton kernel on CUDA where it compiles and agrees with the bmm form on a small case; else the bmms."""
    if device.type != "cuda" or not kernel_takes(latent_dim, rope_dim):
        return torch_mla_decode
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        page, lens = 16, (5, 40)
        cache = torch.randn(6, page, latent_dim + rope_dim, generator=g).to(device, dtype)  # [N, page, L+R]
        q = torch.randn(2, 16, latent_dim + rope_dim, generator=g).to(device, dtype)  # [B, H, L+R]
        tables = torch.tensor([[4, 0, 0], [1, 5, 2]], device=device)
        meta = AttentionMetadata(torch.zeros(2, dtype=torch.long, device=device), tables,
                                 torch.tensor(lens, device=device), (1, 1), lens, page, 2)
        got = paged_mla_decode(q, cache, meta, 0.05, latent_dim)
        want = torch_mla_decode(q, cache, meta, 0.05, latent_dim)
        if torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2):
            return paged_mla_decode
        log.warning("the Triton MLA decode kernel disagrees with the bmm form here; using the bmm form")
    except Exception as e:  # no Triton, or it cannot compile for this device: the bmm form still runs
        if isinstance(e, getattr(torch, "AcceleratorError", ())):
            raise  # the device itself failed (e.g. an illegal address): nothing after would run either
        log.warning("the Triton MLA decode kernel is unavailable (%s); using the bmm form", e)
    return torch_mla_decode
