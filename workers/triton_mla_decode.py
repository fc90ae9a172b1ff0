"""triton_mla_decode: MLA's weight-absorbed decode attention as a Triton kernel over the paged latent cache.

Each decode query [q_latent | q_pe] (one per head) scores the cached entries [c_kv | k_pe] of its sequence, read
in place through the block table, and the softmax-weighted sum of the latents c_kv is the output (W_UV is applied
after, outside). Every head of a sequence reads the same entries, so one program takes a group of heads and loads
each tile of entries once for all of them. The context is cut into splits that run as separate programs (split-KV,
"flash decoding"), so a small batch with a long context still fills the GPU; a second kernel merges the splits by
their log-sum-exp. The split count depends on the batch size and the device only, never on the context, so the
launch has the same grid on every step of a batch size (CUDA-graph safe), and nothing is read back to the host. It
is a runtime argument, not a compile-time one, so every batch size shares one compiled kernel.

Tested on CPU with Triton's interpreter (TRITON_INTERPRET=1, float32 and float16; the interpreter misreads
bfloat16) against the gather-and-bmm form; `benchmarks/gpu_check.py` checks it on CUDA in bfloat16.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK_H = 16  # heads per program (tl.dot's smallest M)
BLOCK_N = 32  # cached entries per tile
MAX_SPLITS = 128


@triton.jit
def _split_kernel(q_ptr, cache_ptr, tables_ptr, lens_ptr, o_ptr, lse_ptr, scale,
                  stride_qb, stride_qh, stride_cn, stride_cs, stride_tb, stride_ob, stride_oh, stride_os,
                  stride_lb, stride_lh,
                  SPLITS, H: tl.constexpr, L: tl.constexpr, R: tl.constexpr, PAGE: tl.constexpr,
                  BH: tl.constexpr, BN: tl.constexpr, DOT: tl.constexpr):
    b = tl.program_id(0)
    heads = tl.program_id(1) * BH + tl.arange(0, BH)  # [BH]
    split = tl.program_id(2)
    hmask = heads < H
    ctx = tl.load(lens_ptr + b)
    per_split = (ctx + SPLITS - 1) // SPLITS
    start = split * per_split
    end = tl.minimum(start + per_split, ctx)
    dl = tl.arange(0, L)
    dr = tl.arange(0, R)
    q_row = q_ptr + b * stride_qb + heads[:, None] * stride_qh  # [BH, 1]
    q_lat = tl.load(q_row + dl[None, :], mask=hmask[:, None], other=0.0)  # [BH, L]
    q_pe = tl.load(q_row + L + dr[None, :], mask=hmask[:, None], other=0.0)  # [BH, R]
    m = tl.full([BH], float("-inf"), tl.float32)
    den = tl.zeros([BH], tl.float32)
    acc = tl.zeros([BH, L], tl.float32)
    for n0 in range(start, end, BN):
        offs = n0 + tl.arange(0, BN)  # [BN] positions in the sequence
        nmask = offs < end
        block = tl.load(tables_ptr + b * stride_tb + offs // PAGE, mask=nmask, other=0).to(tl.int64)
        entry = cache_ptr + block[:, None] * stride_cn + (offs % PAGE)[:, None] * stride_cs  # [BN, 1]
        c_kv = tl.load(entry + dl[None, :], mask=nmask[:, None], other=0.0)  # [BN, L]
        k_pe = tl.load(entry + L + dr[None, :], mask=nmask[:, None], other=0.0)  # [BN, R]
        s = tl.dot(q_lat, tl.trans(c_kv), input_precision=DOT) + tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT)
        s = tl.where(nmask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])  # [BH, BN]
        alpha = tl.exp(m - m_new)
        acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv, input_precision=DOT)  # [BH, L]
        den = den * alpha + tl.sum(p, 1)
        m = m_new
    empty = end <= start  # a short context leaves the last splits without entries: weight 0 in the merge
    den = tl.where(empty, 1.0, den)
    o = tl.where(empty, 0.0, acc / den[:, None])
    lse = tl.where(empty, float("-inf"), m + tl.log(den))
    tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + dl[None, :], o,
             mask=hmask[:, None])
    tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=hmask)


@triton.jit
def _merge_kernel(o_ptr, lse_ptr, out_ptr, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                  stride_outb, stride_outh, SPLITS, L: tl.constexpr):
    """One (sequence, head): the splits' outputs weighted by their share of the softmax, one split at a time."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    dl = tl.arange(0, L)
    one = tl.arange(0, 1)
    m = tl.full([1], float("-inf"), tl.float32)
    den = tl.zeros([1], tl.float32)
    acc = tl.zeros([L], tl.float32)
    for s in range(SPLITS):  # split 0 is never empty, so m is finite from the first split on
        lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + s + one)  # [1]; -inf for an empty split
        o = tl.load(o_ptr + b * stride_ob + h * stride_oh + s * stride_os + dl)  # [L]
        m_new = tl.maximum(m, lse)
        alpha = tl.exp(m - m_new)
        w = tl.exp(lse - m_new)
        acc = acc * alpha + w * o
        den = den * alpha + w
        m = m_new
    tl.store(out_ptr + b * stride_outb + h * stride_outh + dl, (acc / den).to(out_ptr.dtype.element_ty))


@functools.cache
def _num_programs(device: torch.device) -> int:
    """Programs that fill the device about twice: its multiprocessors, twice (a CPU under the interpreter: 2)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 2


def num_splits(batch: int, heads: int, device: torch.device) -> int:
    """Splits of each context: enough programs to fill the device, from the batch size alone (graph-safe)."""
    programs = batch * triton.cdiv(heads, BLOCK_H)
    return max(1, min(MAX_SPLITS, triton.cdiv(_num_programs(device), programs)))


def triton_mla_decode(q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                      scale: float, latent_dim: int, block_n: int = BLOCK_N, num_warps: int = 4,
                      num_stages: int = 2) -> torch.Tensor:
    """q [B, H, L+R], cache [N, page, L+R], block_tables [B, M], context_lens [B] (each >= 1) -> [B, H, L].
    block_n, num_warps, num_stages: the split kernel's tile and launch settings (gpu_check sweeps them)."""
    B, H, E = q.shape
    L, R = latent_dim, E - latent_dim
    assert q.stride(-1) == cache.stride(-1) == 1, "the kernel reads rows of q and of the cache as contiguous"
    S = num_splits(B, H, q.device)
    o = torch.empty(B, H, S, L, dtype=torch.float32, device=q.device)  # [B, H, S, L] each split's output
    lse = torch.empty(B, H, S, dtype=torch.float32, device=q.device)  # [B, H, S]
    _split_kernel[(B, triton.cdiv(H, BLOCK_H), S)](
        q, cache, block_tables, context_lens, o, lse, scale,
        q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), block_tables.stride(0),
        o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1), S,
        H=H, L=L, R=R, PAGE=cache.shape[1], BH=BLOCK_H, BN=block_n,
        DOT="ieee" if q.dtype == torch.float32 else "tf32",  # float32 stays float32 (no TF32 rounding)
        num_warps=num_warps, num_stages=num_stages)
    out = q.new_empty(B, H, L)  # [B, H, L]
    _merge_kernel[(B, H)](o, lse, out, o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
                          out.stride(0), out.stride(1), S, L=L)
    return out
