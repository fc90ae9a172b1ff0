"""Recovery time of a model instance whose worker dies: worker killed -> first successful request.

    python benchmarks/recovery.py [--attention-workers 1] [--expert-workers 2] [--rounds 6]

One local Ray node, the Serve app over HTTP with one engine replica, the tiny DeepSeek-V2 checkpoint (float32, a
torch thread per worker). Each round starts a streaming request and, once its first tokens are out, kills a
worker actor (ray.kill; the workers in turn: each expert, then each attention rank). Times from the kill:
- error: the stream ends with the engine's error, naming the dead worker;
- recovered: the first request that succeeds afterwards (sent as soon as the stream ended, so it waits for the
  workers to be rebuilt), with the same greedy tokens as before any kill, from the same replica.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from workers.multiproc_executor import free_port  # noqa: E402

PROMPT = "def fibonacci(n):"
SHORT = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
LONG = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}


def kill_mid_stream(url: str, victim: str) -> tuple[float, float, str, list[int]]:
    """Seconds from the kill to the stream's error and to the first successful request; the error message, and
    that request's tokens."""
    import httpx
    import ray

    from cluster.ray_executor import NAMESPACE

    with httpx.stream("POST", url, json=LONG, timeout=120) as r:
        replica = r.headers["x-moe-serve-replica"]
        events = (json.loads(e[6:]) for e in r.iter_lines() if e.startswith("data: {"))
        next(events)
        ray.kill(ray.get_actor(f"moe-serve/{replica}/{victim}", namespace=NAMESPACE))
        killed = time.monotonic()
        last = list(events)[-1]
    errored = time.monotonic() - killed
    if "error" not in last:
        raise SystemExit(f"the stream ended without an error after {victim} was killed: {last}")
    after = httpx.post(url, json=SHORT, timeout=300)
    recovered = time.monotonic() - killed
    if after.status_code != 200 or after.headers["x-moe-serve-replica"] != replica:
        raise SystemExit(f"no recovery after {victim} was killed: {after.status_code} {after.text}")
    return errored, recovered, last["error"]["message"], after.json()["choices"][0]["token_ids"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--attention-workers", type=int, default=1)
    ap.add_argument("--expert-workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()

    import httpx
    import ray
    from ray import serve

    from cluster.serve_app import ServeOptions, build_serve_app
    from cluster.tiny_checkpoint import make_checkpoint
    from router.engine_config import EngineConfig

    A, E = args.attention_workers, args.expert_workers
    ckpt = make_checkpoint("v2_lite", Path(tempfile.mkdtemp()))
    config = EngineConfig(model=str(ckpt), dtype="float32", kv_cache_gib=0.05, max_model_len=512, worker_threads=1,
                          attention_workers=A, expert_workers=E)
    ray.init(num_cpus=A + E + 1, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1/completions"
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.monotonic()
        serve.run(build_serve_app(ServeOptions(config, model_name="tiny")), name="moe-serve", route_prefix="/")
        deployed = time.monotonic() - t0
        want = httpx.post(url, json=SHORT, timeout=120).json()["choices"][0]["token_ids"]
        workers = [f"expert-{i}" for i in range(E)] + [f"attention-{r}" for r in range(A)]
        rows = []
        for i in range(args.rounds):
            victim = workers[i % len(workers)]
            errored, recovered, message, tokens = kill_mid_stream(url, victim)
            if tokens != want:
                raise SystemExit(f"after {victim} was killed the tokens changed: {tokens} != {want}")
            if f"/{victim} died" not in message:
                raise SystemExit(f"the error does not name {victim}: {message}")
            rows.append((victim, errored, recovered))
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"{A} attention + {E} expert workers; first deploy (Serve app ready) {deployed:.2f} s\n")
    print("| round | killed | stream error after (s) | first successful request after (s) |")
    print("|---:|---|---:|---:|")
    for i, (victim, errored, recovered) in enumerate(rows, 1):
        print(f"| {i} | {victim} | {errored:.3f} | {recovered:.2f} |")
    rec = [r for *_, r in rows]
    print(f"\nrecovery: median {statistics.median(rec):.2f} s, min {min(rec):.2f} s, max {max(rec):.2f} s")


if __name__ == "__main__":
    main()
