"""CpuMLADecode: MLA's absorbed decode attention on x86 CPUs, read from the paged cache: in bf16 with AVX512-BF16,
in float32 with AVX2 and FMA.

The C kernel (`csrc/cpu_mla_decode.c`; its float32 sibling `csrc/cpu_mla_decode_f32.c`) scores each decode query
against its sequence's cached [c_kv | k_pe] entries where they lie in the cache, and sums the c_kv weighted by the
softmax, accumulating in fp32: a sequence and block of heads at a time, a tile of entries at a time (the softmax
kept online, so each entry is read from memory once). Against the bmm form (`torch_mla_decode`) this skips the
per-layer gather of the padded context, the padded scores, and the small-matrix overheads of oneDNN and MKL.

The library is compiled once per source and flags with the system C compiler (`$CC`, default `cc`) into
`$MOE_SERVE_KERNEL_CACHE` (default `~/.cache/moe-serve/kernels`) and loaded with ctypes. The kernel shares its
work out over torch.get_num_threads() OpenMP threads, from torch's own pool (see the C source).
`CpuMLADecode.build()` returns None where the CPU, the compiler or the widths do not fit.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.attention_metadata import AttentionMetadata

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SHARED = ("-O3", "-fopenmp", "-shared", "-fPIC")


@dataclass(frozen=True)
class KernelVariant:
    """One dtype's kernel: its C source, the compiler flags and CPU flags it needs, and the widths it steps by."""
    source: Path
    flags: tuple[str, ...]
    cpu_flags: frozenset[str]
    entry_chunk: int  # an entry [c_kv | k_pe] is read this many elements at a time
    latent_chunk: int  # latents per value accumulator block


VARIANTS = {
    torch.bfloat16: KernelVariant(CSRC / "cpu_mla_decode.c",
                                  (*SHARED, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"),
                                  frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}), 32, 16),
    torch.float32: KernelVariant(CSRC / "cpu_mla_decode_f32.c", (*SHARED, "-mavx2", "-mfma"),
                                 frozenset({"avx2", "fma"}), 8, 16),
}
_P, _I = ctypes.c_void_p, ctypes.c_int64


def cpu_flags() -> set[str]:
    """This CPU's feature flags (x86 Linux); empty elsewhere."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return set()
    try:
        return set(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return set()


def compile_library(variant: KernelVariant) -> Path:
    """The kernel library, compiled into the cache directory unless it is there already."""
    source = variant.source.read_bytes()
    key = hashlib.sha256(source + " ".join(variant.flags).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MOE_SERVE_KERNEL_CACHE", Path.home() / ".cache" / "moe-serve" / "kernels"))
    lib = cache / f"{variant.source.stem}-{key}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # renamed into place: concurrent builders never clash
        os.close(fd)
        try:
            subprocess.run([os.environ.get("CC", "cc"), *variant.flags, "-o", tmp, str(variant.source)], check=True,
                           capture_output=True, text=True, timeout=120)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


class CpuMLADecode:
    """Callable as an `MLADecode`: (q [B, H, L+R], cache [N, page, L+R], meta, scale, L) -> [B, H, L], all in the
    kernel's dtype."""

    def __init__(self, lib: ctypes.CDLL, dtype: torch.dtype):
        self.lib, self.dtype = lib, dtype
        lib.mla_decode.argtypes = [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I, ctypes.c_float, _P, _I]

    @classmethod
    def build(cls, latent_dim: int, rope_dim: int, dtype: torch.dtype) -> CpuMLADecode | None:
        variant = VARIANTS.get(dtype)
        if variant is None:
            return None  # no kernel for this dtype
        if not latent_dim or (latent_dim + rope_dim) % variant.entry_chunk or latent_dim % variant.latent_chunk:
            return None  # not an MLA model (no latents), or widths the kernel does not step through whole
        if not variant.cpu_flags <= cpu_flags():
            return None
        try:
            return cls(ctypes.CDLL(str(compile_library(variant))), dtype)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # RuntimeError: no home directory
            detail = getattr(e, "stderr", "") or str(e)
            log.warning("could not build the CPU MLA decode kernel (%s); using the bmm form", detail.strip()[:500])
            return None

    def __call__(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                 latent_dim: int) -> torch.Tensor:
        B, H, D = q.shape
        assert q.dtype == cache.dtype == self.dtype and D == cache.shape[-1], "[B, H, L+R] query and cache"
        q, tables, lens = q.contiguous(), meta.block_tables[:B], meta.context_lens[:B]
        assert tables.dtype == lens.dtype == torch.int64 and tables.is_contiguous() and cache.is_contiguous()
        out = q.new_empty(B, H, latent_dim)  # [B, H, L]
        self.lib.mla_decode(q.data_ptr(), cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), B, H, D, latent_dim,
                            cache.shape[1], tables.shape[1], scale, out.data_ptr(), torch.get_num_threads())
        return out
