"""WorkerActor: one attention or expert worker of a model instance as a Ray actor, placed and driven by RayExecutor.

It builds its worker as a MultiprocExecutor process does (`build_worker`). An expert actor runs its all-to-all
rounds in one long `serve` call; it is made with max_concurrency=2, so it still answers `reported` meanwhile.
"""

from __future__ import annotations

import queue

import ray

from workers.multiproc_executor import build_worker, free_port


@ray.remote
class WorkerActor:
    def __init__(self):
        self.worker = None
        self.reports: queue.SimpleQueue = queue.SimpleQueue()  # an expert's stats, one per REPORT round

    def node(self) -> dict:
        """Where this actor runs: its node's id and IP."""
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address()}

    def free_port(self) -> int:
        """A port free on this node (rank 0's is the rendezvous)."""
        return free_port(ray.util.get_node_ip_address())

    def start(self, config, model_config, placement, rank: int, init_method: str, threads: int) -> dict:
        """Joins the groups (every rank at once) and builds the worker; returns its info()."""
        self.worker = build_worker(config, model_config, placement, rank, init_method, threads)
        return self.worker.info()

    def execute(self, plan):
        return self.worker.execute(plan)

    def report(self) -> dict:
        return self.worker.report()

    def serve(self) -> None:
        """An expert's rounds, until STOP."""
        self.worker.serve(self.reports.put)

    def reported(self, timeout_s: float) -> dict:
        """An expert's stats from the next REPORT round."""
        return self.reports.get(timeout=timeout_s)
