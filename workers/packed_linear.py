"""A linear layer whose weight is reordered once, at build time, into oneDNN's blocked layout (CPU).

torch's bf16 matmul on CPU reorders the weight on every call; reordered once, the model's projections run about 2x
faster on an AVX512-BF16 machine (512 -> 3072: 118 -> 55 us at one token, 226 -> 131 us at 64), with the same result
bits as `F.linear` (both are oneDNN's kernel). In float32 torch's matmul is MKL's, which on an AVX2 AMD machine ran
a 64-row GEMM on one of the two cores (64 x 512 -> 3072: 2.8 ms, against 1.5 ms packed on both; the mini model's
decode step ~15-20% faster, float32 rounding differences aside). `pack_linears` swaps them in after the weights are
loaded, or in float32 with AVX2 or AVX-512 the C grouped GEMM's `CpuLinear`, faster again at small batches. Inputs are
padded to a few row counts (`bucket_rows`), so oneDNN builds its kernels for a handful of shapes, not for every token
count the scheduler produces: served at concurrency 64, TTFT p50 ~300 instead of ~545 ms. `warm_up` builds those kernels
at start, before the first request waits for them.
"""

from __future__ import annotations

import platform
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

from workers.cpu_linear import CpuLinear


def packing_helps(device: torch.device, dtype: torch.dtype) -> bool:
    """On CPU with oneDNN: float32 on x86 (where it was measured), and bf16 where the CPU has oneDNN's bf16
    kernels."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.float32:
        return platform.machine() in ("x86_64", "AMD64")
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())  # [N, K], oneDNN layout
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [M, K]
        out = packed_linear(rows, self.packed, self.bias)  # [M, N]
        return out.view(*x.shape[:-1], out.shape[-1])  # [..., N]


EXACT_ROWS = 16  # row counts up to this run unpadded
WARM_ROWS = 256  # `warm_up` builds the kernels of the row buckets up to this


def bucket_rows(m: int) -> int:
    """m rounded up to one of four sizes per power of two (at most 25% more rows) above EXACT_ROWS. oneDNN builds
    a kernel for each new input shape (~3 ms for a 512-wide layer here, against 0.3 ms to run it at 500 rows), and
    a serving engine's token counts change step after step; bucketed, the kernels are built once and cached."""
    if m <= EXACT_ROWS:
        return m
    step = 1 << ((m - 1).bit_length() - 3)  # (2^(b-1), 2^b] in steps of 2^(b-3)
    return -(-m // step) * step


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] through a weight reordered by `_reorder_linear_weight`, its rows padded to their bucket -> [M, N]."""
    M = x.shape[0]
    padded = bucket_rows(M)
    if padded != M:
        x = F.pad(x, (0, 0, 0, padded - M))  # [padded, K], zero rows
    return onednn_linear(x, packed, bias)[:M]  # [M, N]


def onednn_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] through a weight reordered by `_reorder_linear_weight`, as it is (M should be a row bucket)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")  # [M, N]


def row_buckets(max_rows: int) -> list[int]:
    """Every row count `bucket_rows` pads 1..max_rows to."""
    return sorted({bucket_rows(m) for m in range(1, max_rows + 1)})


def warm_up(model: nn.Module, max_rows: int) -> int:
    """Runs each distinct packed weight shape once at every row bucket up to max_rows (at most WARM_ROWS), on zeros,
    so that oneDNN's kernels (cached by shape, shared by the layers) are built now, not while the first requests
    wait; returns how many calls were run. Above WARM_ROWS a call's own work dwarfs the ~3 ms of building its kernel,
    and warming there would cost start-up time on a large model (the lm_head of a 100K vocabulary at 2048 rows)."""
    weights = {}  # (K, N, dtype, bias?) -> one packed weight of that shape, with its bias
    for module in model.modules():
        if isinstance(module, PackedLinear):
            pairs = [(module.packed, module.bias)]
        else:
            pairs = [(w, None) for w in getattr(module, "packed_weights", ())]
        for w, bias in pairs:
            weights.setdefault((*w.shape[::-1], w.dtype, bias is not None), (w, bias))
    buckets = row_buckets(min(max_rows, WARM_ROWS))
    for rows in buckets:
        for (k, _, dtype, _), (w, bias) in weights.items():
            packed_linear(torch.zeros(rows, k, dtype=dtype, device=w.device), w, bias)
    return len(weights) * len(buckets)


def pack_linears(model: nn.Module) -> int:
    """Replaces each nn.Linear of the loaded model by a CpuLinear where the C kernel takes it (float32 with AVX2 or
    AVX-512), else by a PackedLinear; returns how many. Left as it is: a layer whose weight is shared (a tied
    lm_head: packing it would keep two copies). MLA's kv_b_proj is not an nn.Linear: `pack_kv_b` packs it for the C
    kernel."""
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))  # a shared weight: 2+
    return replace_modules(model, lambda m: isinstance(m, nn.Linear) and owners[id(m.weight)] == 1,
                           lambda m: CpuLinear.build(m) or PackedLinear(m))


def replace_modules(model: nn.Module, wanted, build) -> int:
    """Swaps every submodule m for which wanted(m) holds by build(m), unless that is None; returns how many."""
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if wanted(child) and (built := build(child)) is not None:
                setattr(module, name, built)
                count += 1
    return count
