"""Autoscaling on a local Ray: under concurrent streaming load the engine replicas (each with an attention and an
expert worker) go from 1 to 2, and back to 1 once the load drops, while a client keeps streaming through the
scale-down; every request ends complete, and the removed replica's workers stop. `moe-serve status` on the
scaled-up cluster names both replicas with their KV cache, their worker actors by node, and the two router
(Ingress) replicas."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402
from ray.util.state import list_actors  # noqa: E402

from cluster.serve_app import ServeOptions, build_serve_app  # noqa: E402
from router.engine_config import EngineConfig  # noqa: E402
from workers.multiproc_executor import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 32


@pytest.fixture(scope="module")
def app(checkpoint_dir):
    config = EngineConfig(model=str(checkpoint_dir("v2_lite")), dtype="float32", kv_cache_gib=0.05,
                          max_model_len=512, worker_threads=1, expert_workers=1)
    options = ServeOptions(config, model_name="tiny", min_replicas=1, max_replicas=2, target_ongoing_requests=2,
                           upscale_delay_s=1.0, downscale_delay_s=2.0, look_back_period_s=2.0, engine_cpus=1,
                           router_replicas=2, routing_stats_period_s=0.5)
    http_port = free_port()
    ray.init(address="local", num_cpus=8, include_dashboard=True, dashboard_port=free_port(), log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port})
    serve.run(build_serve_app(options), name="moe-serve", route_prefix="/")
    yield f"http://127.0.0.1:{http_port}"
    serve.shutdown()
    ray.shutdown()


def engine_replicas() -> dict:
    return serve.status().applications["moe-serve"].deployments["EngineServer"].replica_states


def worker_actors() -> list[str]:
    alive = list_actors(ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")])
    return [a.name for a in alive if a.name.startswith("moe-serve/")]


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {engine_replicas()}"
        time.sleep(0.2)


class Load:
    """`clients` threads, each streaming one completion after another while its index is below `active`."""

    def __init__(self, url: str, clients: int):
        self.url, self.active, self.results, self.errors = url, clients, [], []
        self.threads = [threading.Thread(target=self.client, args=(i,)) for i in range(clients)]
        for t in self.threads:
            t.start()

    def client(self, i: int) -> None:
        body = {"prompt": "def f(x):", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        while i < self.active:
            try:
                with httpx.stream("POST", self.url + "/v1/completions", json=body, timeout=120) as r:
                    data = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
                    self.results.append((r.status_code, r.headers.get("x-moe-serve-replica"), data))
            except httpx.HTTPError as e:
                self.errors.append(repr(e))

    def replicas(self) -> set:
        return {replica for _, replica, _ in self.results}

    def stop(self) -> None:
        self.active = 0
        for t in self.threads:
            t.join(120)


def complete(result) -> bool:
    """200, [DONE] at the end, the last choice stopped for length, and all MAX_TOKENS tokens counted."""
    status, _, data = result
    if status != 200 or data[-1] != "[DONE]":
        return False
    chunks = [json.loads(d) for d in data[:-1]]
    finish = [c["finish_reason"] for chunk in chunks for c in chunk["choices"] if c["finish_reason"]]
    return finish == ["length"] and chunks[-1]["usage"]["completion_tokens"] == MAX_TOKENS


def test_engine_replicas_scale_up_under_load_and_down_after_losing_nothing(app):
    assert engine_replicas() == {"RUNNING": 1}
    load = Load(app, clients=8)
    try:
        wait_for(lambda: engine_replicas().get("RUNNING") == 2, 60, "a second engine replica")
        wait_for(lambda: len(load.replicas()) == 2, 30, "requests served by both replicas")
        gcs = ray.get_runtime_context().gcs_address
        status = subprocess.run([sys.executable, "-m", "cluster.cli", "status", "--address", gcs], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        out = status.stdout
        assert "Serve application 'moe-serve': RUNNING" in out and "EngineServer: HEALTHY, replicas: 2 RUNNING" in out
        assert "Ingress: HEALTHY, replicas: 2 RUNNING" in out
        for replica in load.replicas():
            assert f"  {replica} on " in out and f"moe-serve#EngineServer#{replica}" in out, out
        assert out.count("% of ") == 2 and "KV cache" in out, out
        for replica in load.replicas():
            assert f"moe-serve/{replica}/attention-0" in out and f"moe-serve/{replica}/expert-0" in out, out
        load.active = 1  # one client keeps streaming through the scale-down
        wait_for(lambda: engine_replicas() == {"RUNNING": 1}, 60, "the scale-down to one replica")
        wait_for(lambda: len(worker_actors()) == 2, 30, "the removed replica's workers to stop")
        time.sleep(1.0)
    finally:
        load.stop()
    assert not load.errors, load.errors[:3]
    assert len(load.results) > 16 and all(complete(r) for r in load.results), \
        [r for r in load.results if not complete(r)][:2]
