"""The CPU engine's decode step beside this machine's hardware limit, on 1 and 2 torch threads.

    python benchmarks/cpu_roofline.py [--dtype bfloat16] [--work DIR]

The model is offline_throughput.py's mini DeepSeek-V2 (real MLA widths). For each thread count:

- copy bandwidth: a 512 MiB tensor copied, bytes read plus written per second (as gpu_check.py counts it);
- weight stream: the rate at which the packed bf16 linear kernel reads its weights at one token, cycling through
  256 MiB of 512 -> 3072 weights (more than the caches hold, as a decode step's ~90 MiB of weights are);
- the engine's decode step at batch 1 and 64: the median of three rounds of 15 steps, after the prompts (32
  tokens each) are in and 8 steps have run; context is the mean tokens per sequence over the timed steps;
- matmul: a 2048 x 2048 by 2048 x 2048 matmul in the model's dtype, FLOP/s (the median of five);
- the roofline (`benchmarks/roofline.py`): the lower of two rates, as decode tokens/s: the bytes that step reads
  (the weights its tokens use, plus the cached latents) over the copy bandwidth ("memory"), and the step's FLOPs
  (each token through the weights it uses, and the attention over its context) at the matmul rate ("compute").
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from benchmarks.roofline import compute_tok_s, roofline_tok_s, step_bytes, step_flops  # noqa: E402

PROMPT_LEN, WARM_STEPS, STEPS, ROUNDS = 32, 8, 15, 3


def copy_bandwidth() -> float:
    a = torch.ones(2**28, dtype=torch.int16)  # 512 MiB
    b = torch.empty_like(a)
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        b.copy_(a)
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() * a.element_size() / statistics.median(times[1:])


def matmul_rate(dtype: torch.dtype) -> float:
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 2048**3 / statistics.median(times[1:])


def weight_stream(dtype: torch.dtype) -> float:
    from workers.packed_linear import packed_linear

    weights = [torch.ops.mkldnn._reorder_linear_weight(torch.randn(3072, 512, dtype=dtype)) for _ in range(85)]
    x = torch.randn(1, 512, dtype=dtype)
    for w in weights:  # kernels built, pages touched
        packed_linear(x, w)
    t0 = time.perf_counter()
    for _ in range(3):
        for w in weights:
            packed_linear(x, w)
    return 3 * sum(w.numel() * w.element_size() for w in weights) / (time.perf_counter() - t0)


def start_decoding(engine, batch: int, max_tokens: int, warm_steps: int) -> None:
    """`batch` requests of PROMPT_LEN random tokens (greedy, ignore_eos), prefilled, then warm_steps decode steps."""
    from workers.sampling_params import SamplingParams

    rng = random.Random(batch)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for _ in range(batch):
        engine.add_request([rng.randrange(2, 8192) for _ in range(PROMPT_LEN)], params)
    while engine.scheduler.waiting:  # the prefills
        engine.step()
    for _ in range(warm_steps):
        engine.step()


def decode_step(engine, batch: int) -> tuple[float, float]:
    """(median ms per decode step, mean context) for `batch` sequences decoding together."""
    start_decoding(engine, batch, WARM_STEPS + ROUNDS * STEPS + 8, WARM_STEPS)
    rounds = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        for _ in range(STEPS):
            engine.step()
        rounds.append((time.perf_counter() - t0) / STEPS * 1000)
    while engine.has_unfinished():
        engine.step()
    context = PROMPT_LEN + 1 + WARM_STEPS + ROUNDS * STEPS / 2
    return statistics.median(rounds), context


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/moe-serve-serving-bench"))
    ap.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args()
    from benchmarks.offline_throughput import make_checkpoint
    from router.engine_config import EngineConfig
    from router.llm_engine import LLMEngine

    model = make_checkpoint(args.work / "mini-deepseek-v2")
    config = json.loads((model / "config.json").read_text())
    dtype = getattr(torch, args.dtype)
    engine = LLMEngine.from_config(EngineConfig(model=str(model), dtype=args.dtype))
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        copy, stream, matmul = copy_bandwidth(), weight_stream(dtype), matmul_rate(dtype)
        for batch in (1, 64):
            ms, context = decode_step(engine, batch)
            weights, cache = step_bytes(config, batch, round(context))
            memory = roofline_tok_s(config, batch, round(context), copy)
            compute = compute_tok_s(config, batch, round(context), matmul)
            rows.append({"threads": threads, "copy_gb_s": copy / 1e9, "stream_gb_s": stream / 1e9,
                         "matmul_gflop_s": matmul / 1e9, "batch": batch, "context": context, "step_ms": ms,
                         "tok_s": batch / ms * 1000, "step_mib": (weights + cache) / 2**20,
                         "step_gflop": step_flops(config, batch, round(context)) / 1e9,
                         "memory_tok_s": memory, "compute_tok_s": compute, "roofline_tok_s": min(memory, compute)})
    print(f"mini DeepSeek-V2, {args.dtype}, decode step on this machine's CPU: {describe()}")
    print(f"{'threads':>7} {'copy GB/s':>9} {'stream GB/s':>11} {'matmul GFLOP/s':>14} {'batch':>5} {'context':>7} "
          f"{'step ms':>8} {'tok/s':>7} {'step MiB':>8} {'step GFLOP':>10} {'memory tok/s':>12} "
          f"{'compute tok/s':>13} {'of roofline':>11}")
    for r in rows:
        print(f"{r['threads']:>7} {r['copy_gb_s']:>9.1f} {r['stream_gb_s']:>11.1f} {r['matmul_gflop_s']:>14.0f} "
              f"{r['batch']:>5} {r['context']:>7.1f} {r['step_ms']:>8.2f} {r['tok_s']:>7.0f} {r['step_mib']:>8.1f} "
              f"{r['step_gflop']:>10.2f} {r['memory_tok_s']:>12.0f} {r['compute_tok_s']:>13.0f} "
              f"{r['tok_s'] / r['roofline_tok_s']:>10.0%}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
