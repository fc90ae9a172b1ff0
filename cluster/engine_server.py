"""EngineServer: one whole model instance (its engine, attention and expert workers) as a Ray Serve replica.

`generate` streams a request's outputs. Its first item is the replica's answer to the request: a Accepted with the
replica's id and stats, or the refusal raised (ValueError for bad input, EngineBusy when the queue is full), so the
router can answer 400 or 429 before anything streams. Closing the stream (a client that left) aborts the request.
`record_routing_stats` tells LeastWorkRouter how much work the replica holds.

With workers, they are Ray actors placed across the cluster (RayExecutor); the replica is ready only once every
worker is up. When one dies, the requests in flight end with an error naming it, and the engine is rebuilt in
place with new workers while new requests wait; if that fails, the health check fails and Serve replaces the
replica.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import NamedTuple

from cluster.ray_executor import RayExecutor, WorkerPools
from cluster.status_board import publish
from router.async_engine import AsyncEngine
from router.engine_config import EngineConfig
from router.engine_stats import EngineStats
from router.llm_engine import LLMEngine
from router.resumed_sample import ResumedSample
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class Accepted(NamedTuple):
    replica: str
    stats: EngineStats


class EngineInfo(NamedTuple):
    max_model_len: int
    vocab_size: int


class EngineServer:
    def __init__(self, config: EngineConfig, pools: WorkerPools):
        from ray import serve

        self.replica = serve.get_replica_context().replica_id.unique_id
        build = partial(LLMEngine.from_config, config,
                        executor_cls=partial(RayExecutor, pools=pools, name=f"moe-serve/{self.replica}"))
        self.engine = AsyncEngine(build, rebuild=build)  # built on the engine's thread, which steps it
        log.info("engine replica %s ready: %s", self.replica, config.model)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       session_id: str | None = None, resumed: tuple[ResumedSample, ...] = ()):
        outputs = await self.engine.submit(prompt_ids, params, request_id, session_id, resumed)
        try:
            yield Accepted(self.replica, self.engine.stats())
            async for out in outputs:
                yield out
        finally:
            outputs.close()

    async def end_session(self, session_id: str) -> None:
        await self.engine.end_session(session_id)

    def info(self) -> EngineInfo:
        return EngineInfo(self.engine.max_model_len, self.engine.model_config.vocab_size)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def record_routing_stats(self) -> dict:
        s = self.engine.stats()
        publish(self.replica, s)  # for `moe-serve status`
        return {"outstanding_tokens": s.outstanding_tokens, "kv_usage": s.kv_usage, "waiting": s.waiting,
                "alive": self.engine.alive}

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine loop has stopped")

    def __del__(self):
        self.engine.shutdown()
