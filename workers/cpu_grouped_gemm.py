"""CpuGroupedGemm: the C grouped GEMM (`csrc/grouped_gemm_f32.c`) in float32 on x86 CPUs with AVX2 and FMA, or
AVX-512: groups of rows, each times its own weight, in one call, the weights cut into panels of PANEL outputs once, at
build time.

The routed experts (`CpuExperts`: a group per expert) and the float32 linear layers (`CpuLinear`: one group) run
through it. oneDNN splits a small GEMM's outputs over the threads in fixed shares; the kernel instead lets the
threads take (group, row chunk, panels) items as they go, and needs no row padding.

The kernel is built for AVX-512 where the CPU has it, else for AVX2: on the 2-core Zen 5 machine the AVX2 build ran at
a quarter to a half of oneDNN's AVX-512 rate from 16 rows up, the AVX-512 build level with it or ahead.
MOE_SERVE_CPU_ISA=avx2 keeps the AVX2 build there (for A/Bs).
"""

from __future__ import annotations

import ctypes

import torch

from workers.c_library import AVX2, AVX512, CSRC, CLibrary, pick_isa

BUILDS = {"avx512": CLibrary(CSRC / "grouped_gemm_f32.c", AVX512, frozenset({"avx512f", "avx2", "fma"})),
          "avx2": CLibrary(CSRC / "grouped_gemm_f32.c", AVX2, frozenset({"avx2", "fma"}))}


def library() -> CLibrary | None:
    """The build for this CPU (`pick_isa`); None where it runs neither."""
    isa = pick_isa({isa: build.cpu_flags for isa, build in BUILDS.items()})
    return None if isa is None else BUILDS[isa]

PANEL = 16  # outputs per weight panel (the kernel's NR)
_P, _I = ctypes.c_void_p, ctypes.c_int64


def pack_panels(w: torch.Tensor) -> torch.Tensor:
    """[G, N, K] weights -> [G, N / PANEL, K, PANEL]: each group's outputs in panels of PANEL, a panel k-major."""
    G, N, K = w.shape
    return w.reshape(G, N // PANEL, PANEL, K).transpose(2, 3).contiguous()


class CpuGroupedGemm:
    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.grouped_gemm.argtypes = [_P, _P, _I, _P, _I, _I, _P, _I]

    @staticmethod
    def load() -> CpuGroupedGemm | None:
        """The kernel (compiled once into the kernel cache); None where this CPU lacks AVX2 and FMA, or where it
        does not build (with a warning: the callers then run through oneDNN)."""
        build = library()
        lib = None if build is None else build.load("the CPU grouped GEMM kernel",
                                                    "the experts and linear layers run through oneDNN")
        return None if lib is None else CpuGroupedGemm(lib)

    def __call__(self, x: torch.Tensor, panels: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x [T, K] sorted by group, panels [G, N / PANEL, K, PANEL], offsets [G + 1] (int64) -> [T, N]."""
        G, P, K, _ = panels.shape
        if (x.dtype != torch.float32 or x.device.type != "cpu" or x.shape[1] != K or offsets.shape != (G + 1,)
                or offsets.dtype != torch.int64 or int(offsets[-1]) != x.shape[0]):  # it would read out of bounds
            raise ValueError(f"grouped GEMM: float32 CPU rows [{int(offsets[-1])}, {K}] for {G} groups expected, "
                             f"not {x.dtype} {x.device.type} {list(x.shape)} with {offsets.shape[0] - 1} group counts")
        x = x.contiguous()
        y = x.new_empty(x.shape[0], P * PANEL)  # [T, N]
        self.lib.grouped_gemm(x.data_ptr(), offsets.data_ptr(), G, panels.data_ptr(), K, P * PANEL, y.data_ptr(),
                              torch.get_num_threads())
        return y
