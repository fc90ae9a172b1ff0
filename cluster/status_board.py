"""The status board: where each engine replica posts its stats for `moe-serve status` to read, a key per replica in
Ray's GCS key-value store (where Ray's own libraries keep their cluster state), in the "moe-serve" namespace.

It used to be a Ray actor. Each Ray worker process wakes ~160 times a second even when idle (its main thread alone
~100: Ray checks for signals every 10 ms), and on a 2-core machine each wake-up can preempt one of the model's two
torch threads while the other waits for it. Without that actor, those threads were preempted ~9% less often under
load (benchmarks/RESULTS.md). A few posts a minute don't need a process of their own.

Replicas post with every health check or routing-stats period (EngineIngress.check_health,
EngineServer.record_routing_stats). A post older than STALE_S, by the posting node's clock, is from a replica that was
scaled down or died: it is not shown, and the reader deletes it. `moe-serve up` clears the board as it stops.
Posts are JSON: anything that can write to the cluster's key-value store could write there, and what the reader loads
must not run code (no pickle).
"""

from __future__ import annotations

import json
import time

import ray
from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_list, _internal_kv_put

from router.engine_stats import EngineStats
from router.worker_stats import WorkerStats, WorkerTime

NAMESPACE, PREFIX = "moe-serve", "engine-stats/"
STALE_S = 10.0


def publish(replica: str, stats: EngineStats) -> None:
    """Posts an engine replica's stats, as of now: one GCS call (the replicas post from a thread, not their event
    loop), from any process connected to the cluster."""
    value = json.dumps([time.time(), ray.get_runtime_context().get_node_id(), stats])  # NamedTuples as lists
    _internal_kv_put(PREFIX + replica, value, overwrite=True, namespace=NAMESPACE)


def read_board() -> dict[str, tuple[str, EngineStats]]:
    """replica -> (node id, stats), of the replicas that posted in the last STALE_S; empty when none has."""
    board, now = {}, time.time()
    for key in _internal_kv_list(PREFIX, namespace=NAMESPACE):
        value = _internal_kv_get(key, namespace=NAMESPACE)
        if value is None:  # deleted since it was listed
            continue
        post = parsed(value)
        if post is not None and now - post[0] < STALE_S:
            board[key.decode()[len(PREFIX):]] = post[1:]
        else:  # stale, or not a post
            _internal_kv_del(key, namespace=NAMESPACE)
    return board


def parsed(value: bytes) -> tuple[float, str, EngineStats] | None:
    """(posted, node id, stats) from a post's JSON; None if it isn't one."""
    try:
        posted, node, (*counts, workers) = json.loads(value)
        if workers is not None:
            expert_tokens, times = workers
            workers = WorkerStats(tuple(expert_tokens), tuple(WorkerTime(*t) for t in times))
        return float(posted), str(node), EngineStats(*counts, workers)
    except (ValueError, TypeError):
        return None


def remove_board() -> None:
    _internal_kv_del(PREFIX, del_by_prefix=True, namespace=NAMESPACE)
