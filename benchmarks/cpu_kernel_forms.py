"""The C kernels on CPU in float32, each family against the form it replaced, in the engine's steps. The grouped
GEMM's three uses: the routed experts (`CpuExperts` against `PackedExperts`' loop of oneDNN GEMMs), the linear layers
(`CpuLinear` against oneDNN's `PackedLinear`) and MLA's absorbed W_UK and W_UV (`CpuKvBProjection` against
`KvBProjection`'s bmms); and the RMSNorms (`CpuRMSNorm` against torch's ops).

    python benchmarks/cpu_kernel_forms.py [--work DIR] [--rounds 12] [--batch 1 --batch 16 --batch 64]

One engine (offline_throughput.py's mini DeepSeek-V2, float32, 2 torch threads) holds both forms of each. Decode:
per batch size, `batch` sequences (32 random prompt tokens) decode together, and every STEPS steps one family
switches form (alternating which goes first), the others staying on the C kernel; medians of ms per step over
--rounds rounds (the contexts grow by 16 tokens a round on the way). Prefill: 64 fresh prompts of 32 tokens, one
family's form switched per prefill, the same way. In one process, so the machine's drift from minute to minute falls
on both forms alike.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_roofline import PROMPT_LEN, start_decoding  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from workers.cpu_experts import CpuExperts  # noqa: E402
from workers.cpu_kv_b_projection import CpuKvBProjection  # noqa: E402
from workers.cpu_linear import CpuLinear  # noqa: E402
from workers.cpu_rms_norm import CpuRMSNorm  # noqa: E402
from workers.experts import Experts  # noqa: E402
from workers.kv_b_projection import KvBProjection  # noqa: E402
from workers.packed_experts import PackedExperts  # noqa: E402
from workers.packed_linear import PackedLinear, warm_up  # noqa: E402
from workers.rms_norm import RMSNorm  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402

STEPS = 4
FAMILIES = ("experts", "linears", "kv_b", "norms")
Slot = tuple[object, str, object, object]  # (owner, attribute, C form, replaced form)


def engine_with_both_forms(model: Path, max_batched_tokens: int):
    """The engine, each of its experts and linear layers held in both forms, on the C kernel's; and those slots by
    family."""
    from router.engine_config import EngineConfig
    from router.llm_engine import LLMEngine
    from workers import model_runner

    slots: dict[str, list[Slot]] = {family: [] for family in FAMILIES}

    def pack(family, wanted, c_form, other_form):
        def swap(model: nn.Module) -> int:
            for owner in list(model.modules()):
                for name, child in list(owner.named_children()):
                    if wanted(child):
                        slots[family].append((owner, name, c_form(child), other_form(child)))
                        setattr(owner, name, slots[family][-1][2])
            return len(slots[family])
        return swap

    real = model_runner.pack_linears, model_runner.pack_experts, model_runner.pack_kv_b, model_runner.pack_norms
    model_runner.pack_linears = pack("linears", lambda m: isinstance(m, nn.Linear), CpuLinear.build, PackedLinear)
    model_runner.pack_experts = pack("experts", lambda m: isinstance(m, Experts), CpuExperts.build, PackedExperts)
    model_runner.pack_kv_b = pack("kv_b", lambda m: type(m) is KvBProjection, CpuKvBProjection.build,
                                  lambda m: m)  # the bmms
    model_runner.pack_norms = pack("norms", lambda m: type(m) is RMSNorm, CpuRMSNorm.build, lambda m: m)  # torch ops
    try:
        engine = LLMEngine.from_config(EngineConfig(model=str(model), dtype="float32",
                                                    max_num_batched_tokens=max_batched_tokens))
    finally:
        model_runner.pack_linears, model_runner.pack_experts, model_runner.pack_kv_b, model_runner.pack_norms = real
    for family, pairs in slots.items():
        assert pairs and all(c is not None for _, _, c, _ in pairs), f"the C kernel does not take the {family} here"
    warm_up(nn.ModuleList([other for _, _, _, other in slots["linears"] + slots["experts"]]), max_batched_tokens)
    return engine, slots


def use(slots: list[Slot], form: int) -> None:
    """form 0: the C kernel; 1: the replaced form."""
    for owner, name, *forms in slots:
        setattr(owner, name, forms[form])


def alternate(slots: dict[str, list[Slot]], rounds: int, timed) -> dict[str, tuple[float, float]]:
    """family -> (median of timed()'s ms on the C kernel, on the replaced form): each round, each family in turn
    switches form (alternating which goes first), the others staying on the C kernel."""
    ms = {family: ([], []) for family in FAMILIES}
    for r in range(rounds):
        for family in FAMILIES:
            for form in (0, 1)[:: 1 if r % 2 else -1]:
                use(slots[family], form)
                ms[family][form].append(timed())
            use(slots[family], 0)
    return {family: (statistics.median(c), statistics.median(o)) for family, (c, o) in ms.items()}


def decode(engine, slots: dict[str, list[Slot]], batch: int, rounds: int) -> dict[str, tuple[float, float]]:
    """family -> (median ms per decode step on the C kernel, on the replaced form), `batch` sequences together."""
    start_decoding(engine, batch, len(FAMILIES) * 2 * STEPS * rounds + 2 * STEPS + 1, 2 * STEPS)

    def steps() -> float:
        t0 = time.perf_counter()
        for _ in range(STEPS):
            engine.step()
        return (time.perf_counter() - t0) / STEPS * 1000

    result = alternate(slots, rounds, steps)
    while engine.has_unfinished():
        engine.step()
    return result


def prefill(engine, slots: dict[str, list[Slot]], prompts: int, rounds: int) -> dict[str, tuple[float, float]]:
    """family -> (median ms for `prompts` fresh prompts' prefill on the C kernel, on the replaced form)."""
    rng = random.Random(0)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    def wave() -> float:
        for _ in range(prompts):
            engine.add_request([rng.randrange(2, 8192) for _ in range(PROMPT_LEN)], params)
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        return (time.perf_counter() - t0) * 1000

    return alternate(slots, rounds, wave)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/moe-serve-serving-bench"))
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--prefill-rounds", type=int, default=6)
    ap.add_argument("--batch", type=int, action="append", help="decode batch sizes (default 1, 16, 64)")
    args = ap.parse_args()
    from benchmarks.offline_throughput import make_checkpoint

    if CpuLinear.build(nn.Linear(16, 16)) is None:
        print(f"the kernel does not build here ({describe()}): AVX2, FMA and a C compiler are needed")
        return 1
    torch.set_num_threads(2)
    prompts = 64
    engine, slots = engine_with_both_forms(make_checkpoint(args.work / "mini-deepseek-v2"), prompts * PROMPT_LEN)
    print(f"machine: {describe()}\nthe mini DeepSeek-V2 (float32, 2 threads); one family's form switched every "
          f"{STEPS} steps, the others on the C kernel; medians, ms\n")
    print(f"{'family':>8} {'step':>16} {'C kernel':>9} {'replaced':>9} {'speed-up':>8}")
    rows = [(f"decode, batch {b}", decode(engine, slots, b, args.rounds)) for b in args.batch or (1, 16, 64)]
    rows.append((f"prefill {prompts} x {PROMPT_LEN}", prefill(engine, slots, prompts, args.prefill_rounds)))
    for step, result in rows:
        for family, (ours, other) in result.items():
            print(f"{family:>8} {step:>16} {ours:>9.2f} {other:>9.2f} {other / ours:>7.3f}x", flush=True)
    engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
