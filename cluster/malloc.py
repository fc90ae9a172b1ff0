"""The memory allocator of the Ray workers that `moe-serve up` starts: tcmalloc where this machine has it.

On CPU the model allocates large temporaries every step (a 2048-token prefill's MoE combine alone takes tens of
MiB); with tcmalloc instead of glibc's malloc the decode step was ~6% and a prefill ~15% faster here
(benchmarks/RESULTS.md), which is why vLLM's CPU backend asks for it too. It goes in as LD_PRELOAD through the
job's runtime_env, so only Ray's worker processes (the replicas and the model's workers) load it.
"""

from __future__ import annotations

import os
from ctypes.util import find_library


def tcmalloc() -> str | None:
    """The tcmalloc library's name, as the dynamic loader finds it, or None."""
    return find_library("tcmalloc_minimal") or find_library("tcmalloc")


def preload_env(choice: str) -> tuple[dict[str, str], str]:
    """(env_vars for the workers, a line saying which allocator they get)."""
    if "LD_PRELOAD" in os.environ:
        return {}, f"as LD_PRELOAD set here ({os.environ['LD_PRELOAD']})"
    if choice == "system":
        return {}, "the system malloc (resources.malloc: system)"
    lib = tcmalloc()
    if lib is None:
        return {}, "the system malloc: no tcmalloc on this machine (e.g. apt install libtcmalloc-minimal4)"
    return {"LD_PRELOAD": lib}, f"tcmalloc ({lib})"
