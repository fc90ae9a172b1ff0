"""Load held: 256 concurrent streaming clients for two minutes against the CPU default (`moe-serve up`'s config,
configs/tiny-cpu.yaml), on loopback. Every request ends complete (none lost, none cut, none hung), the server's
resident memory grows by less than 10% over the second half, and the p99 time to first token is reported.

    python -m pytest -q -m slow tests/chaos -s      (CHAOS_LOAD_S=120 by default)
"""

import os
import time
from pathlib import Path

import pytest

from cluster.load_generator import BenchRequest
from cluster.serve_config import ServeConfig
from cluster.tiny_checkpoint import default_checkpoint
from tests.chaos.serve_cluster import BackgroundLoad, p99, print_table, serve_app, server_rss
from tests.harness import random_prompts

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml"
CLIENTS = 256
DURATION_S = float(os.environ.get("CHAOS_LOAD_S", "120"))
RSS_PERIOD_S = 5.0


def test_256_streaming_clients_for_two_minutes_lose_nothing_and_memory_stays_flat():
    config = ServeConfig.load(str(CONFIG))
    requests = [BenchRequest(p, 32) for p in random_prompts([64] * 32, vocab=500, seed=8)]
    with serve_app(config.serve_options(str(default_checkpoint()))) as url:
        rss: list[tuple[float, int]] = []
        with BackgroundLoad(url, requests, CLIENTS, DURATION_S) as load:
            while load.thread.is_alive():
                rss.append((time.perf_counter() - load.started, server_rss()))
                load.thread.join(RSS_PERIOD_S)
        run = load.result
    results = run.results
    complete = [r for r in results if r.error is None]
    failed = [r for r in results if r.error is not None]
    half = [b for t, b in rss if t >= DURATION_S / 2]
    growth = (half[-1] - half[0]) / half[0]
    ttft = [r.ttft_s for r in complete]
    print_table(f"load: {CLIENTS} streaming clients, {run.duration_s:.0f} s, tiny-cpu default", [
        "requests", "complete", "errors", "lost", "tokens/s", "p50 TTFT", "p99 TTFT", "RSS at half", "RSS at end",
        "growth, 2nd half"], [[
            len(results), len(complete), len(failed), 0 if not failed else "see errors",
            f"{sum(r.output_tokens for r in complete) / run.duration_s:.0f}",
            f"{sorted(ttft)[len(ttft) // 2]:.2f} s", f"{p99(ttft):.2f} s", f"{half[0] / 2**20:.0f} MiB",
            f"{half[-1] / 2**20:.0f} MiB", f"{growth:+.1%}"]])
    assert len(results) > CLIENTS  # each client got through more than one request
    assert not failed, [r.error for r in failed[:5]]
    assert all(r.output_tokens == 32 for r in complete)
    assert growth < 0.10, rss
