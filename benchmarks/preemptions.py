"""What the processes beside an engine replica cost it under load. Against a server already running, each round is
one `moe-serve bench` (c64 by default), and from /proc it reports, over that bench:
- the replica's two busiest threads (the model's torch threads on 2 cores): how often they were preempted
  (involuntary context switches a second) and the share of time they sat runnable but waiting for a CPU;
- every other process on the machine but the bench client: how often its threads woke (voluntary switches a
  second) and the CPU it used.

    python benchmarks/preemptions.py --base-url http://127.0.0.1:8300 --model mini [--rounds 3]
        [--stop PATTERN] [--replica PATTERN] [--bench-args "..."]

--stop PATTERN pauses (SIGSTOP) the processes whose command line holds PATTERN for every other round, from the
second on, and resumes them after: an A/B of what those processes cost, on one live server. Linux only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BENCH = "--concurrency 64 --num-prompts 192 --input-len 32 --output-len 64 --token-range 2 8192"


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def pids_matching(pattern: str) -> list[int]:
    us = (os.getpid(), os.getppid())  # not this script, nor the shell that started it with the pattern in its line
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in us and pattern in command_line(int(p))]


def thread_counters(pid: int) -> dict[int, tuple[int, int, int, int]]:
    """tid -> (ns on a CPU, ns runnable but waiting, voluntary switches, involuntary switches)."""
    counters = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return counters
    for tid in tids:
        try:
            run_ns, wait_ns, _ = map(int, Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split())
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except (OSError, ValueError):
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        counters[int(tid)] = (run_ns, wait_ns, int(fields["voluntary_ctxt_switches"]),
                              int(fields["nonvoluntary_ctxt_switches"]))
    return counters


def snapshot() -> dict[int, dict[int, tuple[int, int, int, int]]]:
    return {int(p): thread_counters(int(p)) for p in os.listdir("/proc") if p.isdigit()}


def deltas(before: dict, after: dict) -> dict[int, dict[int, list[int]]]:
    return {pid: {tid: [a - b for a, b in zip(c, before[pid].get(tid, (0, 0, 0, 0)))] for tid, c in threads.items()}
            for pid, threads in after.items() if pid in before}


def bench(args, seed: int, out: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "cluster.cli", "bench", "--base-url", args.base_url, "--seed", str(seed),
           "--out", out, *shlex.split(args.bench_args)] + (["--model", args.model] if args.model else [])
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def one_round(args, replica: int, seed: int, stopped: list[int]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    try:
        before, t0 = snapshot(), time.monotonic()
        client = bench(args, seed, out)
        if client.wait() != 0:
            raise SystemExit(f"the bench failed (exit {client.returncode}); is the server at {args.base_url}?")
        after, seconds = snapshot(), time.monotonic() - t0
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
    moved = deltas(before, after)
    compute = sorted(moved[replica].values(), key=lambda c: -c[0])[:2]
    side = [c for pid, threads in moved.items() if pid not in (replica, client.pid) for c in threads.values()]
    run = json.loads(Path(out).read_text())["runs"][0]
    Path(out).unlink()
    return {"tok_s": run["output_tokens_per_s"], "tpot_p99": run["tpot_ms"]["p99"],
            "preempted_s": sum(c[3] for c in compute) / seconds,
            "wait_pct": sum(c[1] for c in compute) / len(compute) / 1e9 / seconds * 100,
            "side_wakeups_s": sum(c[2] for c in side) / seconds,
            "side_cpu_pct": sum(c[0] for c in side) / 1e9 / seconds * 100}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None)
    p.add_argument("--replica", default="ServeReplica:moe-serve:EngineIngress",
                   help="a string in the engine replica's command line (the no-Ray server: 'cluster.inproc')")
    p.add_argument("--stop", default=None, help="pause the processes matching this in every other round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=10)
    p.add_argument("--bench-args", default=DEFAULT_BENCH)
    args = p.parse_args()
    replicas = pids_matching(args.replica)
    if len(replicas) != 1:
        p.error(f"{len(replicas)} processes match --replica {args.replica!r}; name one")
    replica = replicas[0]
    print(f"replica: pid {replica} ({command_line(replica)[:60].strip()})", flush=True)
    print("| round | paused | output tok/s | TPOT p99 ms | compute threads preempted/s | their run-queue wait | "
          "other processes' wake-ups/s | their CPU |\n|---:|---|---:|---:|---:|---:|---:|---:|", flush=True)
    for r in range(args.rounds):
        stopped = pids_matching(args.stop) if args.stop and r % 2 == 1 else []
        stopped = [pid for pid in stopped if pid != replica]
        m = one_round(args, replica, args.seed + r, stopped)
        paused = f"{args.stop} ({len(stopped)})" if stopped else "none"
        print(f"| {r + 1} | {paused} | {m['tok_s']:.1f} | {m['tpot_p99']:.1f} | {m['preempted_s']:.0f} | "
              f"{m['wait_pct']:.1f}% | {m['side_wakeups_s']:.0f} | {m['side_cpu_pct']:.1f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
