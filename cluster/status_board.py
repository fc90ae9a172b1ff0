"""StatusBoard: a named Ray actor where each engine replica posts its stats, for `moe-serve status` to read.

Replicas post every routing-stats period (EngineServer.record_routing_stats); a replica that stopped posting
(scaled down, dead) drops off after STALE_S. Detached, so that it outlives the replica that made it.
"""

from __future__ import annotations

import time
from functools import cache

import ray

from router.engine_stats import EngineStats

NAME, NAMESPACE = "status-board", "moe-serve"
STALE_S = 10.0


@ray.remote(num_cpus=0)
class StatusBoard:
    def __init__(self):
        self.posts: dict[str, tuple[float, str, EngineStats]] = {}  # replica -> (time, node id, stats)

    def post(self, replica: str, node_id: str, stats: EngineStats) -> None:
        self.posts[replica] = (time.monotonic(), node_id, stats)

    def read(self) -> dict[str, tuple[str, EngineStats]]:
        """replica -> (node id, stats), of the replicas that posted lately."""
        now = time.monotonic()
        self.posts = {r: p for r, p in self.posts.items() if now - p[0] < STALE_S}
        return {r: (node, stats) for r, (_, node, stats) in self.posts.items()}


@cache
def board():
    return StatusBoard.options(name=NAME, namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote()


def publish(replica: str, stats: EngineStats) -> None:
    """Posts an engine replica's stats, without waiting."""
    board().post.remote(replica, ray.get_runtime_context().get_node_id(), stats)


def read_board() -> dict[str, tuple[str, EngineStats]]:
    """What the replicas posted; empty when none has."""
    try:
        actor = ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:
        return {}
    return ray.get(actor.read.remote())


def remove_board() -> None:
    try:
        ray.kill(ray.get_actor(NAME, namespace=NAMESPACE))
    except ValueError:
        pass
