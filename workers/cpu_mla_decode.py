"""CpuMLADecode: MLA's absorbed decode attention in bf16 on x86 CPUs with AVX512-BF16, read from the paged cache.

The C kernel (`csrc/cpu_mla_decode.c`) scores each decode query against its sequence's cached [c_kv | k_pe]
entries where they lie in the cache, and sums the c_kv weighted by the softmax, with bf16 dot products into fp32:
a sequence and block of heads at a time, a tile of entries at a time (the softmax kept online, so each entry is read
from memory once). Against the bmm form (`torch_mla_decode`) this skips the per-layer gather of the padded context,
the padded scores, and oneDNN's small-matrix overheads.

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
from pathlib import Path

import torch

from workers.attention_metadata import AttentionMetadata

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "cpu_mla_decode.c"
FLAGS = ("-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-shared", "-fPIC")
ENTRY_CHUNK, LATENT_CHUNK = 32, 16  # bf16 per score dot product step; latents per value accumulator
_P, _I = ctypes.c_void_p, ctypes.c_int64


def cpu_has_avx512_bf16() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= set(flags.split())


def compile_library() -> Path:
    """The kernel library, compiled into the cache directory unless it is there already."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MOE_SERVE_KERNEL_CACHE", Path.home() / ".cache" / "moe-serve" / "kernels"))
    lib = cache / f"cpu_mla_decode-{key}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # renamed into place: concurrent builders never clash
        os.close(fd)
        try:
            subprocess.run([os.environ.get("CC", "cc"), *FLAGS, "-o", tmp, str(SOURCE)], check=True,
                           capture_output=True, text=True, timeout=120)
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


class CpuMLADecode:
    """Callable as an `MLADecode`: (q [B, H, L+R], cache [N, page, L+R], meta, scale, L) -> [B, H, L], all bf16."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.mla_decode.argtypes = [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I, ctypes.c_float, _P, _I]

    @classmethod
    def build(cls, latent_dim: int, rope_dim: int) -> CpuMLADecode | None:
        if not latent_dim or (latent_dim + rope_dim) % ENTRY_CHUNK or latent_dim % LATENT_CHUNK:
            return None  # not an MLA model (no latents), or widths the kernel does not step through whole
        if not cpu_has_avx512_bf16():
            return None
        try:
            return cls(ctypes.CDLL(str(compile_library())))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # RuntimeError: no home directory
            detail = getattr(e, "stderr", "") or str(e)
            log.warning("could not build the CPU MLA decode kernel (%s); using the bmm form", detail.strip()[:500])
            return None

    def __call__(self, q: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                 latent_dim: int) -> torch.Tensor:
        B, H, D = q.shape
        assert q.dtype == cache.dtype == torch.bfloat16 and D == cache.shape[-1], "bf16 [B, H, L+R] query and cache"
        q, tables, lens = q.contiguous(), meta.block_tables[:B], meta.context_lens[:B]
        assert tables.dtype == lens.dtype == torch.int64 and tables.is_contiguous() and cache.is_contiguous()
        out = q.new_empty(B, H, latent_dim)  # [B, H, L]
        self.lib.mla_decode(q.data_ptr(), cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), B, H, D, latent_dim,
                            cache.shape[1], tables.shape[1], scale, out.data_ptr(), torch.get_num_threads())
        return out
