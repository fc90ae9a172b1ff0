"""CLibrary: one of the C kernels in `csrc/`, compiled once per source (with the headers in `csrc/`) and flags with
the system C compiler (`$CC`, default `cc`) into `$MOE_SERVE_KERNEL_CACHE` (default `~/.cache/moe-serve/kernels`) and
loaded with ctypes."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SHARED = ("-O3", "-fopenmp", "-shared", "-fPIC")
AVX2 = (*SHARED, "-mavx2", "-mfma")
AVX512 = (*SHARED, "-mavx512f", "-mavx2", "-mfma")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (x86 Linux); empty elsewhere. Read once: every MoE layer's kernel asks at start."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return frozenset()
    try:
        return frozenset(next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                              if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return frozenset()


ISAS = ("avx512", "avx2")  # the kernels' builds, widest first


def pick_isa(builds: dict[str, frozenset[str]]) -> str | None:
    """The widest of `builds` (instruction sets of ISAS, each with the CPU flags it needs) that this CPU runs, and no
    wider than MOE_SERVE_CPU_ISA where that is set (=avx2 keeps an AVX-512 machine on the AVX2 builds, for A/Bs);
    None where there is none."""
    cap = os.environ.get("MOE_SERVE_CPU_ISA")
    if cap and cap not in ISAS:
        raise ValueError(f"MOE_SERVE_CPU_ISA={cap!r}: expected one of {', '.join(ISAS)}")
    allowed = ISAS[ISAS.index(cap):] if cap else ISAS
    return next((isa for isa in allowed if isa in builds and builds[isa] <= cpu_flags()), None)


@dataclass(frozen=True)
class CLibrary:
    source: Path
    flags: tuple[str, ...]
    cpu_flags: frozenset[str]  # what the flags need of the CPU

    def path(self) -> Path:
        """The compiled library, built into the cache directory unless it is there already."""
        source = self.source.read_bytes() + b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))  # + includes
        key = hashlib.sha256(source + " ".join(self.flags).encode()).hexdigest()[:16]
        cache = Path(os.environ.get("MOE_SERVE_KERNEL_CACHE", Path.home() / ".cache" / "moe-serve" / "kernels"))
        lib = cache / f"{self.source.stem}-{key}.so"
        if not lib.exists():
            cache.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)  # renamed into place: concurrent builders never clash
            os.close(fd)
            try:
                subprocess.run([os.environ.get("CC", "cc"), *self.flags, "-o", tmp, str(self.source)], check=True,
                               capture_output=True, text=True, timeout=120)
                os.replace(tmp, lib)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return lib

    def load(self, what: str, fallback: str) -> ctypes.CDLL | None:
        """The loaded library; None where this CPU lacks its flags, or (with a warning naming `what` and the
        `fallback` used instead) where it does not build."""
        if not self.cpu_flags <= cpu_flags():
            return None
        try:
            return ctypes.CDLL(str(self.path()))
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:  # RuntimeError: no home directory
            detail = getattr(e, "stderr", "") or str(e)
            log.warning("could not build %s (%s); %s", what, detail.strip()[:500], fallback)
            return None
