"""Recovery of a model instance whose worker dies, seen from a stream in flight: worker killed -> the stream goes on.

    python benchmarks/recovery.py [--attention-workers 1] [--expert-workers 2] [--rounds 6]

One local Ray node, the Serve app over HTTP with one engine replica, the tiny DeepSeek-V2 checkpoint (float32, a
torch thread per worker). Each round starts a streaming request and, once its first tokens are out, kills a
worker actor (ray.kill; the workers in turn: each expert, then each attention rank). The replica rebuilds its
workers, and the request moves onto the rebuilt engine with its tokens. Measured from the kill:
- pause: the longest gap between two chunks of the stream (the rebuild, as the client feels it);
- end: the stream's end, which must be complete and unbroken: the text of a run without the kill;
- then a new request, which must give the greedy tokens of before any kill, from the same replica.
"""

from __future__ import annotations

import argparse
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
    """Seconds from the kill to the longest pause's end and to the stream's end; the streamed text, and the
    tokens of a request sent after it."""
    import httpx
    import ray

    from cluster.ray_executor import NAMESPACE
    from tests.harness import sse_events

    with httpx.stream("POST", url, json=LONG, timeout=120) as r:
        replica = r.headers["x-moe-serve-replica"]
        events = sse_events(r)
        text = [next(events)["choices"][0]["text"]]
        ray.kill(ray.get_actor(f"moe-serve/{replica}/{victim}", namespace=NAMESPACE))
        killed = last = time.monotonic()
        pause = 0.0
        for event in events:
            if "error" in event:
                raise SystemExit(f"the stream failed after {victim} was killed: {event}")
            now = time.monotonic()
            pause, last = max(pause, now - last), now
            text.append(event["choices"][0]["text"])
    ended = time.monotonic() - killed
    after = httpx.post(url, json=SHORT, timeout=300)
    if after.status_code != 200 or after.headers["x-moe-serve-replica"] != replica:
        raise SystemExit(f"no recovery after {victim} was killed: {after.status_code} {after.text}")
    return pause, ended, "".join(text), after.json()["choices"][0]["token_ids"]


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
        unbroken = httpx.post(url, json={**LONG, "stream": False}, timeout=120).json()["choices"][0]["text"]
        workers = [f"expert-{i}" for i in range(E)] + [f"attention-{r}" for r in range(A)]
        rows = []
        for i in range(args.rounds):
            victim = workers[i % len(workers)]
            pause, ended, text, tokens = kill_mid_stream(url, victim)
            if text != unbroken:
                raise SystemExit(f"after {victim} was killed the moved stream differs from the unbroken one")
            if tokens != want:
                raise SystemExit(f"after {victim} was killed the tokens changed: {tokens} != {want}")
            rows.append((victim, pause, ended))
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"{A} attention + {E} expert workers; first deploy (Serve app ready) {deployed:.2f} s\n")
    print("| round | killed | longest pause in the stream (s) | stream ended, complete and unbroken, after (s) |")
    print("|---:|---|---:|---:|")
    for i, (victim, pause, ended) in enumerate(rows, 1):
        print(f"| {i} | {victim} | {pause:.2f} | {ended:.2f} |")
    pauses = [p for _, p, _ in rows]
    print(f"\npause: median {statistics.median(pauses):.2f} s, min {min(pauses):.2f} s, max {max(pauses):.2f} s")


if __name__ == "__main__":
    main()
