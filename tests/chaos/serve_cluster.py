"""What the chaos tests share: a Serve app on a local Ray, load from a background thread, and the server's RSS."""

from __future__ import annotations

import asyncio
import os
import statistics
import threading
import time
from contextlib import contextmanager

import psutil
import ray
from ray import serve

from cluster.load_generator import BenchRequest, LoadGenerator, RequestResult, RunResult
from cluster.serve_app import SERVE_ENV, build_serve_app
from workers.multiproc_executor import free_port

HANG_S = 60.0  # a stream silent this long counts as hung


@contextmanager
def serve_app(options, num_cpus: int = 8):
    """The app of `options` on a fresh local Ray set up as `moe-serve up` sets it up (SERVE_ENV); yields its HTTP
    base URL."""
    port = free_port()
    saved = dict(os.environ)
    os.environ.update(SERVE_ENV)  # the local Ray's processes take it from this one as they start
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_serve_app(options), name="moe-serve", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def server_rss() -> int:
    """Bytes resident in every process Ray started for this test (controller, proxy, replicas, workers)."""
    total = 0
    for p in psutil.Process().children(recursive=True):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class BackgroundLoad:
    """`concurrency` streaming clients, in a thread of their own, for duration_s."""

    def __init__(self, base_url: str, requests: list[BenchRequest], concurrency: int, duration_s: float):
        self.generator = LoadGenerator(base_url, timeout_s=HANG_S)
        self.args = (requests, concurrency, duration_s)
        self.result: RunResult | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        requests, concurrency, duration_s = self.args

        async def run() -> RunResult:
            model = await self.generator.served_model()
            return await self.generator.run(model, requests, concurrency, duration_s=duration_s)

        self.result = asyncio.run(run())

    def __enter__(self) -> "BackgroundLoad":
        self.started = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.thread.join()


def in_flight_at(results, t: float) -> list[RequestResult]:
    """The requests sent before t that had not ended by then."""
    return [r for r in results if r.sent_at < t < r.sent_at + r.e2e_s]


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) > 1 else values[0]


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
