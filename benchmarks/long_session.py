"""A chat session grown past 100K tokens on a tiny DeepSeek-V2 model with DeepSeek-V2's real context (YaRN x40 over
4K = 160K positions), through the real HTTP server and the official `openai` client.

    python benchmarks/long_session.py [--turn-tokens 8192] [--target 102400] [--work DIR]

Each turn sends the whole conversation (as OpenAI clients do) with the session header, adds `--turn-tokens` of
new user text, and generates 16 tokens. The table shows, per turn, the session's size, the prompt tokens the
cache served, the ones computed, and the turn's time: with the session pinned, each turn computes only its new
tokens, however long the history.
"""

from __future__ import annotations

import argparse
import random
import socket
import string
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turn-tokens", type=int, default=8192)
    ap.add_argument("--target", type=int, default=102400, help="grow the session past this many tokens")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()

    import httpx
    import openai
    import uvicorn

    from cluster.tiny_checkpoint import LONG_CONTEXT, make_checkpoint
    from router.async_engine import AsyncEngine
    from router.engine_config import EngineConfig
    from router.llm_engine import LLMEngine
    from router.openai_server import build_app

    work = args.work or Path(tempfile.mkdtemp())
    model = work / "tiny-v2-160k"
    if not (model / "config.json").exists():
        make_checkpoint("v2_lite", model, **LONG_CONTEXT)
    engine = AsyncEngine(partial(LLMEngine.from_config, EngineConfig(model=str(model), dtype="float32", device="cpu",
                                                                    kv_cache_gib=0.25, max_num_batched_tokens=4096)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(engine, "tiny"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=3600)
    sid = httpx.post(url + "/v1/sessions", json={}).json()["id"]
    rng = random.Random(0)
    messages, session_tokens, turn = [], 0, 0
    print(f"context {engine.max_model_len} tokens; {args.turn_tokens} new tokens and 16 generated per turn")
    print(f"{'turn':>4} {'session tokens':>14} {'cached':>8} {'computed':>9} {'turn s':>7}")
    start = time.perf_counter()
    while session_tokens <= args.target:
        turn += 1
        words = "".join(rng.choice(string.ascii_lowercase + " \n") for _ in range(args.turn_tokens - 8))
        messages.append({"role": "user", "content": words})
        t = time.perf_counter()
        out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                             extra_headers={"X-Session-ID": sid}, extra_body={"ignore_eos": True})
        took = time.perf_counter() - t
        u = out.usage
        cached = u.prompt_tokens_details.cached_tokens
        session_tokens = u.prompt_tokens + u.completion_tokens
        print(f"{turn:>4} {session_tokens:>14} {cached:>8} {u.prompt_tokens - cached:>9} {took:>7.1f}", flush=True)
        messages.append({"role": "assistant", "content": out.choices[0].message.content})
    print(f"session of {session_tokens} tokens in {turn} turns, {time.perf_counter() - start:.1f} s in all")
    past = httpx.post(url + "/v1/chat/completions", headers={"X-Session-ID": sid},
                      json={"messages": messages + [{"role": "user", "content": "x" * 70000}], "max_tokens": 4})
    print(f"past the context: HTTP {past.status_code}: {past.json()['error']['message']}")
    server.should_exit = True
    engine.shutdown()


if __name__ == "__main__":
    main()
