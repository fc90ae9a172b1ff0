"""The grouped expert GEMM, chosen once at build time for the device and dtype.

`grouped_mm(x [N, K], w [E, K, M], counts [E]) -> [N, M]`, rows of x sorted by group (counts[e] rows for group e).
`torch._grouped_mm` is used where it runs; the fallback walks the groups (experts), never the tokens.
"""

from __future__ import annotations

from typing import Callable

import torch

GroupedMM = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def torch_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    offs = counts.cumsum(0).to(torch.int32)  # [E] end row of each group
    return torch._grouped_mm(x, w, offs=offs)


def looped_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    out = x.new_empty(x.shape[0], w.shape[2])  # [N, M]
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            torch.mm(x[start : start + n], w[e], out=out[start : start + n])
            start += n
    return out


def select_grouped_mm(device: torch.device, dtype: torch.dtype) -> GroupedMM:
    if not hasattr(torch, "_grouped_mm"):
        return looped_grouped_mm
    try:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(48, 64, generator=g).to(device, dtype)
        w = torch.randn(3, 32, 64, generator=g).to(device, dtype).transpose(1, 2)  # stored [E, M, K] like experts
        counts = torch.tensor([16, 0, 32], device=device)
        got = torch_grouped_mm(x, w, counts)
        want = looped_grouped_mm(x, w, counts)
        if torch.allclose(got.float(), want.float(), rtol=2e-2, atol=2e-2):
            return torch_grouped_mm
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    return looped_grouped_mm
