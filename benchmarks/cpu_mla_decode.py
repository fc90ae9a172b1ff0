"""The CPU MLA decode kernel (`workers/cpu_mla_decode.py`) against the gather-and-bmm form, alone and in the step.

    python benchmarks/cpu_mla_decode.py [--work DIR] [--rounds 24] [--dtype bfloat16|float32]

The kernel of --dtype (bf16 needs AVX512-BF16, float32 AVX2 and FMA), in that dtype throughout:
1. Alone: the decode attention of one layer (16 heads, the real widths: latents 512, rope 64) for a batch
   at a context, each form the median of 10 calls after 2, on 1 and 2 torch threads.
2. In the engine's decode step: offline_throughput.py's mini DeepSeek-V2, `batch` sequences (32 prompt
   tokens) decoding together; every 5 steps the layers switch between the two forms (alternating which goes
   first), for --rounds rounds, so both see the same contexts and the same machine; medians of ms per step, over
   the whole run and over its two halves (the contexts of each half are given).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.cpu_roofline import PROMPT_LEN, start_decoding  # noqa: E402
from benchmarks.machine import describe  # noqa: E402
from workers.cpu_mla_decode import CpuMLADecode  # noqa: E402
from workers.mla_decode import decode_case, torch_mla_decode  # noqa: E402

STEPS = 5
LATENT, ROPE, HEADS = 512, 64, 16


def alone(kernel: CpuMLADecode) -> list[tuple]:
    dtype = kernel.dtype
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for batch, context in ((1, 100), (64, 100), (64, 1000), (16, 4000)):
            lens = tuple(context - i % 7 for i in range(batch))
            case = decode_case(lens, HEADS, LATENT, ROPE, torch.device("cpu"), dtype)
            times = []
            for fn in (kernel, torch_mla_decode):
                runs = []
                for _ in range(12):
                    t0 = time.perf_counter()
                    fn(*case, 0.07)
                    runs.append(time.perf_counter() - t0)
                times.append(statistics.median(runs[2:]) * 1e6)
            rows.append((threads, batch, context, *times))
    return rows


def in_step(model: Path, batch: int, threads: int, rounds: int, dtype: str) -> tuple:
    from router.engine_config import EngineConfig
    from router.llm_engine import LLMEngine
    torch.set_num_threads(threads)
    engine = LLMEngine.from_config(EngineConfig(model=str(model), dtype=dtype))
    torch.set_num_threads(threads)
    layers = engine.executor.runner.model.model.layers
    kernel = layers[0].self_attn.mla_decode
    assert isinstance(kernel, CpuMLADecode), "the engine did not choose the kernel here"
    start_decoding(engine, batch, 2 * STEPS * rounds + 2 * STEPS, STEPS)
    ms: dict[str, list[float]] = {"kernel": [], "bmm": []}
    forms = (("kernel", kernel), ("bmm", torch_mla_decode))
    for r in range(rounds):
        for name, fn in forms[:: 1 if r % 2 else -1]:
            for layer in layers:
                layer.self_attn.mla_decode = fn
            t0 = time.perf_counter()
            for _ in range(STEPS):
                engine.step()
            ms[name].append((time.perf_counter() - t0) / STEPS * 1000)
    while engine.has_unfinished():
        engine.step()
    engine.shutdown()
    first = PROMPT_LEN + 1 + STEPS  # context at the first timed step
    mid = first + STEPS * rounds  # two forms x rounds / 2 rounds x STEPS
    med = statistics.median
    half = rounds // 2
    return (batch, threads, f"{first}-{mid}", med(ms["kernel"][:half]), med(ms["bmm"][:half]),
            f"{mid}-{mid + STEPS * rounds}", med(ms["kernel"][half:]), med(ms["bmm"][half:]),
            med(ms["kernel"]), med(ms["bmm"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/moe-serve-serving-bench"))
    ap.add_argument("--rounds", type=int, default=24)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = ap.parse_args()
    from benchmarks.offline_throughput import make_checkpoint

    kernel = CpuMLADecode.build(LATENT, ROPE, getattr(torch, args.dtype))
    if kernel is None:
        print(f"the {args.dtype} kernel does not build here ({describe()}): AVX512-BF16 (bf16) or AVX2 and FMA "
              "(float32), and a C compiler, are needed")
        return 1
    print(f"machine: {describe()}\n")
    print(f"one layer's decode attention alone (16 heads, latents 512 + rope 64, {args.dtype}), us per call")
    print(f"{'threads':>7} {'batch':>5} {'context':>7} {'kernel':>9} {'bmm form':>9} {'speed-up':>8}")
    for threads, batch, context, ours, bmm in alone(kernel):
        print(f"{threads:>7} {batch:>5} {context:>7} {ours:>9.0f} {bmm:>9.0f} {bmm / ours:>7.2f}x")
    model = make_checkpoint(args.work / "mini-deepseek-v2")
    print(f"\nthe mini DeepSeek-V2's decode step ({args.dtype}), the two forms alternated every {STEPS} steps, "
          "ms per step")
    print(f"{'batch':>5} {'threads':>7} | {'contexts':>9} {'kernel':>7} {'bmm':>7} | {'contexts':>9} {'kernel':>7} "
          f"{'bmm':>7} | {'all: kernel':>11} {'bmm':>7} {'speed-up':>8}")
    for batch, threads in ((1, 1), (64, 1), (64, 2)):
        b, t, c1, k1, m1, c2, k2, m2, k, m = in_step(model, batch, threads, args.rounds, args.dtype)
        print(f"{b:>5} {t:>7} | {c1:>9} {k1:>7.2f} {m1:>7.2f} | {c2:>9} {k2:>7.2f} {m2:>7.2f} | {k:>11.2f} {m:>7.2f} "
              f"{m / k:>7.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
