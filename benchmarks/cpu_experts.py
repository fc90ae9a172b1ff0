"""The routed experts on CPU in float32: the C grouped GEMM (`workers/cpu_experts.py`) against the loop of oneDNN
GEMMs it replaced (`workers/packed_experts.py`), alone and in the step.

    python benchmarks/cpu_experts.py [--work DIR] [--rounds 12]

Needs AVX2, FMA and a C compiler (where they are missing, the engine keeps the oneDNN loop).
1. Alone: one MoE layer's routed experts (the two grouped GEMMs and SiLU between) at a number of tokens, routed
   uniformly at random, for the mini DeepSeek-V2's experts (16 of 512 -> 2 x 256, top-4) and
   DeepSeek-Coder-V2-Lite's (64 of 2048 -> 2 x 1408, top-6); each form the median of its calls after 2, on 1 and
   2 torch threads.
2. In the engine's decode step: offline_throughput.py's mini DeepSeek-V2, 64 sequences (32 prompt tokens)
   decoding together on 2 threads; every 5 steps the MoE layers switch between the two forms (alternating which
   goes first), for --rounds rounds; medians of ms per step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_roofline import start_decoding  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from workers.cpu_experts import CpuExperts  # noqa: E402
from workers.experts import Experts  # noqa: E402
from workers.packed_experts import PackedExperts  # noqa: E402
from workers.packed_linear import replace_modules  # noqa: E402

STEPS = 5
SHAPES = {"mini": (16, 512, 256, 4), "V2-Lite": (64, 2048, 1408, 6)}  # experts, hidden, intermediate, top-k


def random_experts(E: int, D: int, I: int) -> Experts:  # noqa: E741
    experts = Experts(SimpleNamespace(hidden_size=D, moe_intermediate_size=I), range(E))
    with torch.no_grad():
        experts.w13.normal_(std=D**-0.5)
        experts.w2.normal_(std=I**-0.5)
    return experts


def alone() -> list[tuple]:
    rows = []
    for name, (E, D, I, k) in SHAPES.items():  # noqa: E741
        experts = random_experts(E, D, I)
        forms = (CpuExperts.build(experts), PackedExperts(experts))
        for tokens in (1, 8, 64, 2048) if name == "mini" else (1, 8, 64):
            counts = torch.bincount(torch.randint(0, E, (tokens * k,), generator=torch.Generator().manual_seed(0)),
                                    minlength=E)  # [E]
            x = torch.randn(tokens * k, D)  # [N, D], sorted by expert
            calls = 12 if tokens * k * D < 2**22 else 5
            for threads in (1, 2):
                torch.set_num_threads(threads)
                times = []
                for form in forms:
                    runs = []
                    for _ in range(calls):
                        t0 = time.perf_counter()
                        form(x, counts)
                        runs.append(time.perf_counter() - t0)
                    times.append(statistics.median(runs[2:]) * 1000)
                rows.append((name, tokens, threads, *times))
    return rows


def in_step(model: Path, batch: int, rounds: int) -> tuple[float, float]:
    from router.engine_config import EngineConfig
    from router.llm_engine import LLMEngine
    from workers import model_runner

    pairs = []

    def both(experts: Experts) -> CpuExperts:
        pairs.append((CpuExperts.build(experts), PackedExperts(experts)))
        return pairs[-1][0]

    real = model_runner.pack_experts
    model_runner.pack_experts = lambda model: replace_modules(model, lambda m: isinstance(m, Experts), both)
    try:
        engine = LLMEngine.from_config(EngineConfig(model=str(model), dtype="float32"))
    finally:
        model_runner.pack_experts = real
    torch.set_num_threads(2)
    moe = [layer.mlp for layer in engine.executor.runner.model.model.layers if hasattr(layer.mlp, "experts")]
    assert len(moe) == len(pairs) and all(cpu is not None for cpu, _ in pairs), "the C kernel did not build here"
    start_decoding(engine, batch, 2 * STEPS * rounds + 2 * STEPS, STEPS)
    ms: dict[int, list[float]] = {0: [], 1: []}  # 0: the C kernel, 1: oneDNN
    for r in range(rounds):
        for form in (0, 1)[:: 1 if r % 2 else -1]:
            for mlp, pair in zip(moe, pairs):
                mlp.experts = pair[form]
            t0 = time.perf_counter()
            for _ in range(STEPS):
                engine.step()
            ms[form].append((time.perf_counter() - t0) / STEPS * 1000)
    engine.shutdown()
    return statistics.median(ms[0]), statistics.median(ms[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/moe-serve-serving-bench"))
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()
    from benchmarks.offline_throughput import make_checkpoint

    if CpuExperts.build(random_experts(2, 16, 16)) is None:
        print(f"the kernel does not build here ({describe()}): AVX2, FMA and a C compiler are needed")
        return 1
    print(f"machine: {describe()}\n")
    print("one layer's routed experts alone (float32), ms per call")
    print(f"{'experts':>8} {'tokens':>6} {'threads':>7} {'C kernel':>9} {'oneDNN':>9} {'speed-up':>8}")
    for name, tokens, threads, ours, onednn in alone():
        print(f"{name:>8} {tokens:>6} {threads:>7} {ours:>9.3f} {onednn:>9.3f} {onednn / ours:>7.2f}x", flush=True)
    model = make_checkpoint(args.work / "mini-deepseek-v2")
    ours, onednn = in_step(model, 64, args.rounds)
    print(f"\nthe mini DeepSeek-V2's decode step (batch 64, 2 threads, float32), the two forms alternated every "
          f"{STEPS} steps: C kernel {ours:.2f} ms, oneDNN {onednn:.2f} ms per step ({onednn / ours:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
