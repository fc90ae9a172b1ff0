"""The CPU a benchmark ran on, in one line: the lent machines differ from day to day (an Intel part with AMX on
some, an AMD EPYC without on others), and bf16 matmul speed with them, so every table names its CPU."""

from __future__ import annotations

import os
import platform
from pathlib import Path

FEATURES = ("amx_bf16", "avx512_bf16", "avx512f", "avx2")  # the bf16 matmul paths, fastest first


def describe() -> str:
    """e.g. 'AMD EPYC, 2 CPUs, avx512_bf16' (the fastest of FEATURES the CPU has)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    best = next((f for f in FEATURES if f in flags), "none of " + ", ".join(FEATURES))
    return f"{model}, {os.cpu_count()} CPUs, {best}"


if __name__ == "__main__":
    print(describe())
