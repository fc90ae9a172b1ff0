"""Per-step time split of disaggregated expert parallelism: attention, dispatch, experts, combine, control.

    python benchmarks/step_breakdown.py [--attention-workers 2] [--expert-workers 2] [--requests 128] [--rounds 2]

The model is offline_throughput.py's mini DeepSeek-V2 (real MLA widths, 16 routed experts top-4), float32. The
workload is --requests requests of 32 random prompt tokens and 32 greedy output tokens, all submitted at once.
Each configuration (micro-batching on: 2 per step; off: 1) runs in a fresh engine, alternated for --rounds, and
a colocated single-process engine runs the same job for reference. Columns are milliseconds per engine step:

- attention: an attention worker's own compute (embeddings, attention, gate, shared experts, lm_head, sampling):
  its busy time less the two below, averaged over the attention workers;
- dispatch: count exchange, sending tokens and waiting for them to leave (attention side);
- combine: waiting for the experts' results (attention side); what the micro-batches overlap shows up here;
- experts: an expert worker's grouped GEMMs (averaged over the expert workers);
- control: the engine's round trip for a step less the slowest attention worker's time in it (pickling the plan
  and the samples, the pipes, waking up).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.offline_throughput import make_checkpoint  # noqa: E402

PROMPT_LEN, MAX_TOKENS, VOCAB = 32, 32, 8192


def run(ckpt: str, prompts: list[list[int]], **topology) -> dict:
    from router.engine_config import EngineConfig
    from router.llm_engine import LLMEngine
    from workers.sampling_params import SamplingParams

    engine = LLMEngine.from_config(EngineConfig(model=ckpt, dtype="float32", **topology))
    try:
        params = [SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)] * len(prompts)
        t0 = time.perf_counter()
        outs = engine.generate(prompts, params)
        wall = time.perf_counter() - t0
        profile = engine.executor.profile()
    finally:
        engine.shutdown()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    row = {"wall_s": wall, "tok_s": tokens / wall, "tokens": [o.outputs[0].token_ids for o in outs]}
    if profile["experts"]:
        steps = profile["steps"]
        att, exp = profile["attention"], profile["experts"]
        ms = lambda seconds: 1000 * seconds / steps  # noqa: E731
        row.update(
            steps=steps, step_ms=ms(wall),
            attention_ms=statistics.mean(ms(a["busy_s"] - a["dispatch_s"] - a["combine_s"]) for a in att),
            dispatch_ms=statistics.mean(ms(a["dispatch_s"]) for a in att),
            combine_ms=statistics.mean(ms(a["combine_s"]) for a in att),
            experts_ms=statistics.mean(ms(e["compute_s"]) for e in exp),
            control_ms=ms(profile["control_s"]))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attention-workers", type=int, default=2)
    ap.add_argument("--expert-workers", type=int, default=2)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="/tmp/moe-serve-offline-bench")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = str(make_checkpoint(work / "ckpt"))
    rng = random.Random(0)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(PROMPT_LEN)] for _ in range(args.requests)]
    A, E = args.attention_workers, args.expert_workers
    configs = {"micro-batching on (2)": dict(attention_workers=A, expert_workers=E, micro_batches=2),
               "micro-batching off (1)": dict(attention_workers=A, expert_workers=E, micro_batches=1)}
    rows: dict[str, list[dict]] = {name: [] for name in configs}
    colocated = []
    for r in range(args.rounds):
        for name, topology in configs.items():
            rows[name].append(run(ckpt, prompts, **topology))
            print(f"round {r + 1}: {name}: {rows[name][-1]['wall_s']:.1f}s", file=sys.stderr, flush=True)
        colocated.append(run(ckpt, prompts))
        print(f"round {r + 1}: colocated: {colocated[-1]['wall_s']:.1f}s", file=sys.stderr, flush=True)
    same = all(row["tokens"] == colocated[0]["tokens"] for runs in rows.values() for row in runs)

    med = lambda runs, key: statistics.median(row[key] for row in runs)  # noqa: E731
    print(f"\n{A} attention + {E} expert workers (gloo, CPU), {args.requests} requests x ({PROMPT_LEN} prompt + "
          f"{MAX_TOKENS} output tokens), float32; medians of {args.rounds} rounds, ms per engine step\n")
    print("| configuration | steps | step ms | attention | dispatch | experts | combine | control | output tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, runs in rows.items():
        print(f"| {name} | {runs[0]['steps']} | {med(runs, 'step_ms'):.1f} | {med(runs, 'attention_ms'):.1f} | "
              f"{med(runs, 'dispatch_ms'):.1f} | {med(runs, 'experts_ms'):.1f} | {med(runs, 'combine_ms'):.1f} | "
              f"{med(runs, 'control_ms'):.2f} | {med(runs, 'tok_s'):.0f} |")
    print(f"| colocated, one process | | | | | | | | {med(colocated, 'tok_s'):.0f} |")
    print(f"\ngreedy tokens identical to the colocated engine in every run: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
