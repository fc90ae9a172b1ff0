"""EngineIngress: one Ray Serve replica that is both the engine and its front doors (OpenAI HTTP and the MoeServe
gRPC service), for a server of one engine replica: `moe-serve up --ingress engine`.

It listens on the server's ports itself (Serve's direct ingress, cluster/direct_ingress.py), and a request reaches
the engine in the same process: no Ray call per request, no Ray stream of outputs per step, and no second process
beside the model's. Where the cores are few that is what counts: on the 2-core machine the separate Ingress took a
share of a core, and (as we read it) its preemptions stalled the model's second torch thread; this replica served
1.2-1.3x the output tokens/s of an Ingress over an engine replica at concurrency 64 (benchmarks/RESULTS.md). For
several engine replicas, or autoscaling, the Ingress routes over EngineServer replicas instead.

The engine is EngineServer's (`replica_engine`): its workers, when it has them, are Ray actors, and a dead one is
replaced in place. Its stats go to the status board with each health check, for `moe-serve status`.
"""

from __future__ import annotations

import asyncio

from cluster.engine_server import replica_engine
from cluster.ray_executor import WorkerPools
from cluster.status_board import publish
from router.engine_config import EngineConfig
from router.ingress import Ingress


class EngineIngress(Ingress):
    def __init__(self, config: EngineConfig, pools: WorkerPools, model_name: str, api_keys: tuple[str, ...] = (),
                 session_ttl_s: float = 1800.0):
        super().__init__(None, config.model, model_name, api_keys, session_ttl_s)
        self._serve(replica_engine(config, pools))

    async def _engine(self):
        return self.engine

    async def _engine_answers(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine loop has stopped")

    async def check_health(self) -> None:
        """Serve's health check (every 2 s): fails once the engine stopped for good, so Serve replaces the replica."""
        await self._engine_answers()
        await asyncio.to_thread(publish, self.engine.replica, self.engine.stats())

    def __del__(self):
        if hasattr(self, "engine"):
            self.engine.shutdown()
