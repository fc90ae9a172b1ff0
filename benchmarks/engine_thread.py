"""Which thread steps the model: decode step time when the engine is built and stepped on one thread, or built on
one thread and stepped on another (what AsyncEngine did before it took a builder).

    python benchmarks/engine_thread.py [--dtype bfloat16] [--work DIR]

Each case runs in a fresh process: offline_throughput.py's mini DeepSeek-V2, 64 requests of 32 random prompt tokens
decoding together; after 20 warm-up steps, six rounds of 15 steps are timed (the context grows by 15 tokens a
round, so the rounds slow a little). On CPU each thread that runs parallel torch work gets its own OpenMP thread
team; "built on main, stepped on a thread" is the case with two.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = {"built and stepped on the main thread": "main",
         "built on main, stepped on another thread": "thread",
         "built and stepped on another thread": "both"}


def measure(model: str, dtype: str, case: str) -> list[float]:
    import random
    import threading
    from functools import partial

    from router.engine_config import EngineConfig
    from router.llm_engine import LLMEngine
    from workers.sampling_params import SamplingParams

    build = partial(LLMEngine.from_config, EngineConfig(model=model, dtype=dtype))
    rounds: list[float] = []

    def run(engine: LLMEngine | None) -> None:
        engine = engine or build()
        rng = random.Random(0)
        params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        for _ in range(64):
            engine.add_request([rng.randrange(2, 8192) for _ in range(32)], params)
        for _ in range(20):
            engine.step()
        for _ in range(6):
            t0 = time.perf_counter()
            for _ in range(15):
                engine.step()
            rounds.append((time.perf_counter() - t0) / 15 * 1000)

    if case == "main":
        run(build())
    else:
        thread = threading.Thread(target=run, args=(build() if case == "thread" else None,))
        thread.start()
        thread.join()
    return rounds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/moe-serve-serving-bench"))
    ap.add_argument("--case", choices=list(CASES.values()), help=argparse.SUPPRESS)  # one case, in this process
    args = ap.parse_args()
    from benchmarks.offline_throughput import make_checkpoint

    model = str(make_checkpoint(args.work / "mini-deepseek-v2"))
    if args.case:
        print(" ".join(f"{x:.2f}" for x in measure(model, args.dtype, args.case)))
        return 0
    print(f"decode step ms at batch 64, {args.dtype}, six rounds of 15 steps")
    print(f"{'case':<44} {'median':>7}   rounds")
    for name, case in CASES.items():
        out = subprocess.run([sys.executable, __file__, "--dtype", args.dtype, "--work", str(args.work),
                              "--case", case], check=True, capture_output=True, text=True).stdout
        rounds = [float(x) for x in out.split()]
        print(f"{name:<44} {statistics.median(rounds):>7.1f}   {' '.join(f'{x:.1f}' for x in rounds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
