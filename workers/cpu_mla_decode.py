"""CpuMLADecode: MLA's absorbed decode attention on x86 CPUs, read from the paged cache: in bf16 with AVX512-BF16,
in float32 with AVX-512 or with AVX2 and FMA.

The C kernel (`csrc/cpu_mla_decode.c`; its float32 sibling `csrc/cpu_mla_decode_f32.c`) scores each decode query
against its sequence's cached [c_kv | k_pe] entries where they lie in the cache, and sums the c_kv weighted by the
softmax, accumulating in fp32: a sequence and block of heads at a time, a tile of entries at a time (the softmax
kept online, so each entry is read from memory once). Against the bmm form (`torch_mla_decode`) this skips the
per-layer gather of the padded context, the padded scores, and the small-matrix overheads of oneDNN and MKL.

The library is compiled and loaded by `CLibrary` (`workers/c_library.py`). The kernel shares its work out over
torch.get_num_threads() OpenMP threads, from torch's own pool (see the C source).
`CpuMLADecode.build()` returns None where the CPU, the compiler or the widths do not fit.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from workers.attention_metadata import AttentionMetadata
from workers.c_library import AVX2, AVX512, CSRC, SHARED, CLibrary, pick_isa


@dataclass(frozen=True)
class KernelVariant:
    """One dtype's kernel: its library, and the widths it steps by."""
    library: CLibrary
    entry_chunk: int  # an entry [c_kv | k_pe] is read this many elements at a time
    latent_chunk: int  # latents per value accumulator block


VARIANTS = {  # per dtype, its builds by instruction set (`pick_isa` chooses)
    torch.bfloat16: {"avx512": KernelVariant(
        CLibrary(CSRC / "cpu_mla_decode.c", (*SHARED, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"),
                 frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})), 32, 16)},
    torch.float32: {
        "avx512": KernelVariant(CLibrary(CSRC / "cpu_mla_decode_f32.c", AVX512, frozenset({"avx512f", "avx2", "fma"})),
                                16, 32),
        "avx2": KernelVariant(CLibrary(CSRC / "cpu_mla_decode_f32.c", AVX2, frozenset({"avx2", "fma"})), 8, 16)},
}


def variant(dtype: torch.dtype) -> KernelVariant | None:
    """dtype's kernel build for this CPU; None where there is none for the dtype and CPU."""
    builds = VARIANTS.get(dtype, {})
    isa = pick_isa({isa: build.library.cpu_flags for isa, build in builds.items()})
    return None if isa is None else builds[isa]


_P, _I = ctypes.c_void_p, ctypes.c_int64


class CpuMLADecode:
    """Callable as an `MLADecode`: (q_latent [H, B, L], q_pe [B, H, R], cache [N, page, L+R], meta, scale) ->
    [H, B, L], all in the kernel's dtype. q_pe may be a strided view (its rows contiguous)."""

    def __init__(self, lib: ctypes.CDLL, dtype: torch.dtype):
        self.lib, self.dtype = lib, dtype
        lib.mla_decode.argtypes = [_P, _P, _I, _I, _P, _P, _P, _I, _I, _I, _I, _I, _I, ctypes.c_float, _P, _I]

    @classmethod
    def build(cls, latent_dim: int, rope_dim: int, dtype: torch.dtype) -> CpuMLADecode | None:
        build = variant(dtype)
        if build is None:
            return None  # no kernel for this dtype
        if not latent_dim or (latent_dim + rope_dim) % build.entry_chunk or latent_dim % build.latent_chunk:
            return None  # not an MLA model (no latents), or widths the kernel does not step through whole
        lib = build.library.load("the CPU MLA decode kernel", "using the bmm form")
        return None if lib is None else cls(lib, dtype)

    def __call__(self, q_latent: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float) -> torch.Tensor:
        H, B, L = q_latent.shape
        D = cache.shape[-1]
        assert q_latent.dtype == q_pe.dtype == cache.dtype == self.dtype, "query and cache in the kernel's dtype"
        assert q_pe.shape == (B, H, D - L), "q_latent [H, B, L], q_pe [B, H, R] and cache [N, page, L+R]"
        q_latent, tables, lens = q_latent.contiguous(), meta.block_tables[:B], meta.context_lens[:B]
        q_pe = q_pe if q_pe.stride(-1) == 1 else q_pe.contiguous()
        assert tables.dtype == lens.dtype == torch.int64 and tables.is_contiguous() and cache.is_contiguous()
        out = q_latent.new_empty(H, B, L)  # [H, B, L]
        self.lib.mla_decode(q_latent.data_ptr(), q_pe.data_ptr(), q_pe.stride(0), q_pe.stride(1), cache.data_ptr(),
                            tables.data_ptr(), lens.data_ptr(), B, H, D, L, cache.shape[1], tables.shape[1], scale,
                            out.data_ptr(), torch.get_num_threads())
        return out
