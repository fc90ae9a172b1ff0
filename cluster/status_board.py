"""The status board: where each engine replica posts its stats for `moe-serve status` to read, a key per replica in
Ray's GCS key-value store (where Ray's own libraries keep their cluster state), in the "moe-serve" namespace.

It used to be a Ray actor. Each Ray worker process wakes ~160 times a second even when idle (its main thread alone
~100: Ray checks for signals every 10 ms), and on a 2-core machine each wake-up can preempt one of the model's two
torch threads while the other waits for it. Without that actor, those threads were preempted ~9% less often under
load (benchmarks/RESULTS.md). A few posts a minute don't need a process of their own.

Replicas post with every health check or routing-stats period (EngineIngress.check_health,
EngineServer.record_routing_stats). A post older than STALE_S, by the posting node's clock, is from a replica that was
scaled down or died: it is not shown, and the reader deletes it. `moe-serve up` clears the board as it stops.
"""

from __future__ import annotations

import pickle
import time

import ray
from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_get, _internal_kv_list, _internal_kv_put

from router.engine_stats import EngineStats

NAMESPACE, PREFIX = "moe-serve", "engine-stats/"
STALE_S = 10.0


def publish(replica: str, stats: EngineStats) -> None:
    """Posts an engine replica's stats, as of now: one GCS call (the replicas post from a thread, not their event
    loop), from any process connected to the cluster."""
    value = pickle.dumps((time.time(), ray.get_runtime_context().get_node_id(), stats))
    _internal_kv_put(PREFIX + replica, value, overwrite=True, namespace=NAMESPACE)


def read_board() -> dict[str, tuple[str, EngineStats]]:
    """replica -> (node id, stats), of the replicas that posted in the last STALE_S; empty when none has."""
    board, now = {}, time.time()
    for key in _internal_kv_list(PREFIX, namespace=NAMESPACE):
        value = _internal_kv_get(key, namespace=NAMESPACE)
        if value is None:  # deleted since it was listed
            continue
        posted, node, stats = pickle.loads(value)
        if now - posted < STALE_S:
            board[key.decode()[len(PREFIX):]] = (node, stats)
        else:
            _internal_kv_del(key, namespace=NAMESPACE)
    return board


def remove_board() -> None:
    _internal_kv_del(PREFIX, del_by_prefix=True, namespace=NAMESPACE)
