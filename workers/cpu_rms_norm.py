"""CpuRMSNorm: RMSNorm in float32 on x86 CPUs with AVX2 and FMA, as one C pass a row (`csrc/rms_norm_f32.c`).

torch runs RMSNorm as six ops, each a dispatch and a pass over the rows; in a decode step of the mini model (13
norms) that is ~1.5-2 ms of ~50 at batch 64, and a larger share at batch 1, where the ops' overhead dominates. The
kernel reads a row, sums its squares in eight lanes (the order of the float32 sum differs from torch's, so the
results differ in the last bits), and scales it by the weight. An input whose rows are a slice of wider rows (MLA's
kv_a_layernorm reads the latent part of [c_kv | k_pe]) is read in place.

`CpuRMSNorm.build` returns None where the dtype, device, CPU or compiler do not fit; MOE_SERVE_CPU_NORM_KERNEL=0
turns it off. `pack_norms` swaps them in after loading.
"""

from __future__ import annotations

import ctypes
import os

import torch
from torch import nn

from workers.c_library import AVX2, CSRC, CLibrary
from workers.packed_linear import replace_modules
from workers.rms_norm import RMSNorm

LIBRARY = CLibrary(CSRC / "rms_norm_f32.c", AVX2, frozenset({"avx2", "fma"}))
_P, _I = ctypes.c_void_p, ctypes.c_int64


class CpuRMSNorm(nn.Module):
    def __init__(self, norm: RMSNorm, lib: ctypes.CDLL):
        super().__init__()
        self.weight = norm.weight
        self.eps = norm.eps
        self.kernel = lib.rms_norm
        self.kernel.argtypes = [_P, _I, _I, _I, _P, ctypes.c_float, _P, _I]
        self.weight_ptr = self.weight.data_ptr()  # loaded in place, never moved: read once (~1 us a call otherwise)

    @classmethod
    def build(cls, norm: RMSNorm) -> CpuRMSNorm | None:
        w = norm.weight
        if os.environ.get("MOE_SERVE_CPU_NORM_KERNEL") == "0" or w.dtype != torch.float32 or w.device.type != "cpu":
            return None
        lib = LIBRARY.load("the CPU RMSNorm kernel", "RMSNorm runs as torch ops")
        return None if lib is None else cls(norm, lib)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., C] -> [..., C]; 2-D rows whose columns are contiguous are read in place (a slice of wider rows)."""
        if x.dim() != 2 or x.stride(-1) != 1:
            return self.forward(x.reshape(-1, x.shape[-1])).view(x.shape)
        if x.dtype != torch.float32:
            raise ValueError(f"RMSNorm kernel: float32 rows expected, not {x.dtype}")
        y = torch.empty(x.shape, dtype=torch.float32)  # [R, C]
        self.kernel(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), self.weight_ptr, self.eps, y.data_ptr(),
                    torch.get_num_threads())
        return y


def pack_norms(model: nn.Module) -> int:
    """Replaces each RMSNorm of the loaded model by a CpuRMSNorm where the kernel takes it (float32 with AVX2);
    returns how many."""
    return replace_modules(model, lambda m: type(m) is RMSNorm, CpuRMSNorm.build)
