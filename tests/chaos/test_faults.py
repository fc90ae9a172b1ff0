"""Faults survived: under streaming load, an attention worker, an expert worker, an engine replica and a router
(Ingress) replica are killed in turn. Each time, every request in flight ends complete or with an explicit error
(none hangs, none is cut off silently), the killed part is replaced, and the times are recorded. A request whose
worker or engine replica died moves to a healthy engine with its tokens and completes as one unbroken stream,
token for token the stream a fault-free run gives. A router replica holds its clients' connections (through Serve's
proxy), so a request in flight on it ends with an error; the next one goes to the other router.

    python -m pytest -q -m slow tests/chaos -s
"""

import asyncio
import time

import pytest
import ray
from ray import serve

from cluster.load_generator import BenchRequest, LoadGenerator
from cluster.ray_executor import NAMESPACE
from cluster.serve_app import ServeOptions
from router.engine_config import EngineConfig
from tests.chaos.serve_cluster import BackgroundLoad, in_flight_at, print_table, serve_app
from tests.harness import random_prompts

pytestmark = pytest.mark.slow

CLIENTS = 24
FIRST_KILL_S = 10.0  # load runs this long before the first kill
BETWEEN_S = 25.0  # and this long from one kill to the next
GRACE_S = 2.0  # after a router replica dies, requests sent this soon may still reach it
RESTORE_S = 45.0  # the most a killed part may take to be replaced
FAULTS = ["attention worker", "expert worker", "engine replica", "router replica"]


def named_actors() -> dict[str, ray.actor.ActorHandle]:
    return {a["name"]: a for a in ray.util.list_named_actors(all_namespaces=True)}


def serve_replicas(deployment: str) -> list[str]:
    return sorted(n for n in named_actors() if n.startswith("SERVE_REPLICA::") and f"#{deployment}#" in n)


def running(deployment: str) -> int:
    return serve.status().applications["moe-serve"].deployments[deployment].replica_states.get("RUNNING", 0)


def kill(fault: str):
    """Kills one part; returns a check that is true once it is replaced."""
    if fault in ("attention worker", "expert worker"):
        kind = fault.split()[0]
        name = next(n for n in sorted(named_actors()) if n.startswith("moe-serve/") and n.endswith(f"/{kind}-0"))
        victim = ray.get_actor(name, namespace=NAMESPACE)
        ray.kill(victim)

        def replaced() -> bool:  # the replica rebuilt its workers in place, and the new one is up
            try:
                reborn = ray.get_actor(name, namespace=NAMESPACE)
                return reborn._actor_id != victim._actor_id and ray.get(reborn.__ray_ready__.remote(), timeout=1)
            except (ValueError, ray.exceptions.GetTimeoutError):
                return False
        return replaced
    deployment = "EngineServer" if fault == "engine replica" else "Ingress"
    before = serve_replicas(deployment)
    ray.kill(ray.get_actor(before[0], namespace="serve"), no_restart=True)
    # Serve started another in its place, and it is running
    return lambda: len(set(serve_replicas(deployment)) - set(before)) == 1 and running(deployment) == 2


def baseline_texts(url: str, requests: list[BenchRequest]) -> set[str]:
    """What each request streams when nothing fails (greedy: one text per prompt)."""
    gen = LoadGenerator(url)

    async def run():
        return await gen.run(await gen.served_model(), requests, concurrency=8)

    results = asyncio.run(run()).results
    assert all(r.error is None for r in results)
    return {r.text for r in results}


def test_killing_each_part_under_load_loses_no_request(checkpoint_dir):
    config = EngineConfig(model=str(checkpoint_dir("v2_lite")), dtype="float32", kv_cache_gib=0.05,
                          max_model_len=512, worker_threads=1, attention_workers=1, expert_workers=1)
    options = ServeOptions(config, model_name="tiny", engine_replicas=2, router_replicas=2,
                           routing_stats_period_s=0.5)
    requests = [BenchRequest(p, 48) for p in random_prompts([24] * 16, seed=9)]
    with serve_app(options) as url:
        want = baseline_texts(url, requests)
        kills = []  # (fault, killed at, replaced after s)
        duration = FIRST_KILL_S + BETWEEN_S * len(FAULTS)
        with BackgroundLoad(url, requests, CLIENTS, duration) as load:
            for i, fault in enumerate(FAULTS):
                time.sleep(max(0.0, load.started + FIRST_KILL_S + BETWEEN_S * i - time.perf_counter()))
                at = time.perf_counter()
                replaced = kill(fault)
                while not replaced():
                    assert time.perf_counter() < at + RESTORE_S, f"the {fault} was not replaced in {RESTORE_S} s"
                    time.sleep(0.1)
                kills.append((fault, at, time.perf_counter() - at))
    results = load.result.results
    rows, moved_ok = [], True
    for fault, at, restore_s in kills:
        hit = in_flight_at(results, at)
        unbroken = [r for r in hit if r.error is None and r.text in want]
        wrong = [r for r in hit if r.error is None and r.text not in want]
        errors = [r for r in hit if r.error is not None]
        hung = [r for r in errors if "Timeout" in r.error]
        assert hit, f"nothing was in flight when the {fault} was killed"
        drained_s = max(r.sent_at + r.e2e_s for r in hit) - at
        rows.append([fault, len(hit), len(unbroken), len(wrong), len(errors) - len(hung), len(hung),
                     f"{restore_s:.1f} s", f"{drained_s:.1f} s", "; ".join(sorted({r.error[:60] for r in errors}))])
        moved_ok &= fault == "router replica" or (not errors and not wrong)
        assert not hung and not wrong, rows[-1]
    print_table(f"faults under load: {CLIENTS} streaming clients, {len(results)} requests", [
        "killed", "in flight", "complete, unbroken", "complete, wrong text", "explicit error", "hung",
        "replaced in", "in-flight all ended in", "errors seen"], rows)
    assert moved_ok, rows
    # sent neither before a kill nor just after a router's (Serve's proxy may still pick the dead one for a moment)
    outside = [r for r in results if not any(r.sent_at < at < r.sent_at + r.e2e_s or
                                             (fault == "router replica" and at <= r.sent_at < at + GRACE_S)
                                             for fault, at, _ in kills)]
    assert all(r.error is None and r.text in want for r in outside), [r.error for r in outside if r.error][:3]
