"""MLA's absorbed decode attention over the paged latent cache, chosen once at build time for the device.

`mla_decode(q_latent [H, B, L], q_pe [B, H, R], cache [N, page, L+R], meta, scale) -> [H, B, L]`: each decode
query [q_latent | q_pe] scores its sequence's cached entries [c_kv | k_pe], and the softmax-weighted sum of the c_kv
is returned (W_UV is applied by the caller). The latent halves are head-major, as the W_UK bmm leaves them and the
W_UV bmm takes them, so the CPU kernels read and write them in place (joining them with q_pe first cost a copy of
the queries a layer); the other forms join what they need.

On CUDA the Triton kernel reads the cache in place through the block tables (`triton_mla_decode`); on x86 CPUs so do
the C kernels of `CpuMLADecode` (bf16 with AVX512-BF16, float32 with AVX2 or AVX-512), where they build, agree, and the
bmm form does not beat them clearly on a probe (MOE_SERVE_CPU_MLA_KERNEL=0 turns them off); elsewhere the entries are
gathered and scored with two bmms.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable

import torch

from workers.attention_metadata import AttentionMetadata

log = logging.getLogger(__name__)

MLADecode = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]


def joined_query(q_latent: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
    """[q_latent | q_pe] per sequence and head: [H, B, L] and [B, H, R] -> [B, H, L+R]."""
    return torch.cat((q_latent.transpose(0, 1), q_pe), dim=-1)


def torch_mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float) -> torch.Tensor:
    """Scores against the gathered entries in one bmm; the latents are also the values, so k_pe's columns are
    dropped after the second."""
    q = joined_query(q_latent, q_pe)  # [B, H, L+R]
    entries, valid = meta.decode_context(cache)  # [B, S, L+R], [B, S]
    scores = torch.bmm(q, entries.transpose(1, 2))  # [B, H, S]
    scores = (scores.float() * scale).masked_fill(~valid[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(entries.dtype)  # [B, H, S]
    return torch.bmm(probs, entries)[..., : q_latent.shape[-1]].transpose(0, 1)  # [H, B, L]


def paged_mla_decode(q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                     scale: float) -> torch.Tensor:
    from workers.triton_mla_decode import triton_mla_decode

    B = q_pe.shape[0]
    out = triton_mla_decode(joined_query(q_latent, q_pe), cache, meta.block_tables[:B], meta.context_lens[:B], scale,
                            q_latent.shape[-1])  # [B, H, L]
    return out.transpose(0, 1)  # [H, B, L]


MIN_DOT_K = 16  # tl.dot's smallest inner dimension; the kernel's dots run over the latent and the rope widths


def kernel_takes(latent_dim: int, rope_dim: int) -> bool:
    """Widths the kernel compiles for: powers of two (tl.arange) of at least MIN_DOT_K."""
    return all(n >= MIN_DOT_K and n & (n - 1) == 0 for n in (latent_dim, rope_dim))


def select_mla_decode(device: torch.device, dtype: torch.dtype, latent_dim: int, rope_dim: int) -> MLADecode:
    """On CUDA, the Triton kernel where it compiles and agrees with the bmm form on a small case; on CPU, the C
    kernel for the dtype where it builds, agrees and is not clearly slower on a probe; else the bmms."""
    if device.type == "cpu" and os.environ.get("MOE_SERVE_CPU_MLA_KERNEL") != "0":
        return _select_cpu(latent_dim, rope_dim, dtype)
    if device.type != "cuda" or not kernel_takes(latent_dim, rope_dim):
        return torch_mla_decode
    try:
        if _agrees(paged_mla_decode, device, dtype, latent_dim, rope_dim):
            return paged_mla_decode
        log.warning("the Triton MLA decode kernel disagrees with the bmm form here; using the bmm form")
    except Exception as e:  # no Triton, or it cannot compile for this device: the bmm form still runs
        if isinstance(e, getattr(torch, "AcceleratorError", ())):
            raise  # the device itself failed (e.g. an illegal address): nothing after would run either
        log.warning("the Triton MLA decode kernel is unavailable (%s); using the bmm form", e)
    return torch_mla_decode


def _select_cpu(latent_dim: int, rope_dim: int, dtype: torch.dtype) -> MLADecode:
    from workers.cpu_mla_decode import CpuMLADecode

    kernel = CpuMLADecode.build(latent_dim, rope_dim, dtype)
    if kernel is None:
        return torch_mla_decode
    cpu = torch.device("cpu")
    if not _agrees(kernel, cpu, dtype, latent_dim, rope_dim):
        log.warning("the CPU MLA decode kernel disagrees with the bmm form here; using the bmm form")
        return torch_mla_decode
    # a probe at a decode batch's scale: 32 sequences of 96-160 tokens
    case = decode_case(tuple(96 + 2 * i for i in range(32)), 16, latent_dim, rope_dim, cpu, dtype)
    ours, bmm = _race((kernel, torch_mla_decode), *case)
    if bmm < ours * (1 - PROBE_MARGIN):
        log.warning("the CPU MLA decode kernel lost the probe (%.0f us, the bmm form %.0f us); using the bmm form",
                    ours * 1e6, bmm * 1e6)
        return torch_mla_decode
    log.info("CPU MLA decode probe: C kernel %.0f us, bmm form %.0f us", ours * 1e6, bmm * 1e6)
    return kernel


PROBE_ROUNDS = 5  # timed runs of each form, taking turns
PROBE_MARGIN = 0.1  # the bmm form is chosen over a kernel that builds and agrees only when this much faster
_clock = time.perf_counter


def _race(forms: tuple[MLADecode, ...], q_latent, q_pe, cache, meta) -> list[float]:
    """Each form's best time over PROBE_ROUNDS runs (after a warm-up run each). The forms take turns, so a passing
    slowdown of the machine (another process on the core, a hypervisor's steal) costs one run of one form rather
    than every run of whichever form it fell on. Timed a form at a time, the probe chose the bmm form (twice as slow
    in the engine) in 3 choices of 40 on a 2-core VM beside a bursty load."""
    best = [math.inf] * len(forms)
    for r in range(PROBE_ROUNDS + 1):
        for i, fn in enumerate(forms):
            t0 = _clock()
            fn(q_latent, q_pe, cache, meta, 0.05)
            if r:  # round 0 warms up
                best[i] = min(best[i], _clock() - t0)
    return best


def _agrees(fn: MLADecode, device: torch.device, dtype: torch.dtype, latent_dim: int, rope_dim: int) -> bool:
    case = decode_case((5, 40), 16, latent_dim, rope_dim, device, dtype)
    got, want = fn(*case, 0.05), torch_mla_decode(*case, 0.05)
    return torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def decode_case(lens: tuple[int, ...], heads: int, latent_dim: int, rope_dim: int, device: torch.device,
                dtype: torch.dtype, page: int = 16,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random decode queries (q_latent [H, B, L], q_pe [B, H, R]) over a paged cache whose blocks are shuffled,
    one sequence per length (for the kernels' checks here and in the tests)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    blocks = [-(-n // page) for n in lens]
    num_blocks = sum(blocks) + 1
    cache = torch.randn(num_blocks, page, latent_dim + rope_dim, generator=g).to(device, dtype)  # [N, page, L+R]
    q = torch.randn(len(lens), heads, latent_dim + rope_dim, generator=g).to(device, dtype)  # [B, H, L+R]
    q_latent, q_pe = q[..., :latent_dim].transpose(0, 1).contiguous(), q[..., latent_dim:]  # [H, B, L], [B, H, R]
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(lens), max(blocks), dtype=torch.long)  # [B, M]
    for i, m in enumerate(blocks):
        tables[i, :m] = torch.tensor(order[sum(blocks[:i]) : sum(blocks[: i + 1])])
    meta = AttentionMetadata(torch.zeros(len(lens), dtype=torch.long, device=device), tables.to(device),
                             torch.tensor(lens, device=device), (1,) * len(lens), lens, page, len(lens))
    return q_latent, q_pe, cache, meta
