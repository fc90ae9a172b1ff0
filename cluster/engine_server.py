"""EngineServer: one whole model instance (its engine, attention and expert workers) as a Ray Serve replica.

`generate` takes a request. Its stream's first item is the replica's answer: an Accepted with the replica's id and
stats, or the refusal raised (ValueError for bad input, EngineBusy when the queue is full), so the router can answer
400 or 429 before anything streams. The request's outputs then go to its Ingress's channel: `outputs` streams
each Ingress replica all of its requests' outputs, a batch per step, where a stream per request would carry a Ray
message per request per token. The request's own stream stays open until the request ends, so Serve counts it
as ongoing (for autoscaling and routing) and closing it (a client that left) aborts the request.
`record_routing_stats` tells LeastWorkRouter how much work the replica holds.

With workers, they are Ray actors placed across the cluster (RayExecutor); the replica is ready only once every
worker is up. When one dies, the requests in flight end with an error naming it, and the engine is rebuilt in
place with new workers while new requests wait; if that fails, the health check fails and Serve replaces the
replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from typing import NamedTuple

from cluster.output_channel import ChannelSink, OutputChannel
from cluster.ray_executor import RayExecutor, WorkerPools
from cluster.status_board import publish
from router.async_engine import AsyncEngine
from router.engine_config import EngineConfig
from router.engine_stats import EngineStats
from router.llm_engine import LLMEngine
from router.resumed_sample import ResumedSample
from workers.gc_freeze import freeze_startup_heap
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class Accepted(NamedTuple):
    replica: str
    stats: EngineStats


class EngineInfo(NamedTuple):
    max_model_len: int
    vocab_size: int


def replica_engine(config: EngineConfig, pools: WorkerPools) -> AsyncEngine:
    """This Serve replica's engine, named by the replica's id (`.replica`): built on the engine's own thread, which
    steps it, and rebuilt in place with new workers when one dies."""
    from ray import serve

    replica = serve.get_replica_context().replica_id.unique_id
    build = partial(LLMEngine.from_config, config,
                    executor_cls=partial(RayExecutor, pools=pools, name=f"moe-serve/{replica}"))
    return AsyncEngine(build, rebuild=build, replica=replica)


class EngineServer:
    def __init__(self, config: EngineConfig, pools: WorkerPools):
        self.engine = replica_engine(config, pools)
        self.replica = self.engine.replica
        self.channels: dict[str, OutputChannel] = {}  # by Ingress replica
        freeze_startup_heap()  # a Serve replica: its process serves this engine until it exits
        log.info("engine replica %s ready: %s", self.replica, config.model)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str, channel: str,
                       session_id: str | None = None, resumed: tuple[ResumedSample, ...] = ()):
        """channel: the Ingress replica's, which gets the outputs (`outputs`)."""
        into = self._channel(channel)
        sink = ChannelSink(into, request_id)
        outputs = await self.engine.submit(prompt_ids, params, request_id, session_id, resumed, sink=sink)
        into.begin()
        try:
            yield Accepted(self.replica, self.engine.stats())
            await sink.ended.wait()
        finally:  # cancelled (the client left, or the Ingress gave up on it): aborted
            outputs.close(ended=sink.ended.is_set())
            into.end()

    async def outputs(self, channel: str, replica: str, linger_s: float = 0.5):
        """The channel's outputs, a list of (request id, its n-th item, output or error) per step, from this
        replica (`replica` is its id: LeastWorkRouter sends the call there). The first item is an empty list, once
        reading. Ends once no request of the channel has been in flight here for linger_s; the Ingress reads
        again with its next request here."""
        if replica != self.replica:
            raise ValueError(f"the outputs of replica {replica} were asked of replica {self.replica}")
        into = self._channel(channel)
        reader = into.attach()
        try:
            yield []
            while (batch := await into.take(reader, linger_s)) is not None:
                yield batch
        finally:
            into.detach()

    def _channel(self, channel: str) -> OutputChannel:
        into = self.channels.get(channel)
        if into is None:
            into = self.channels[channel] = OutputChannel()
        return into

    def _drop_unused_channels(self, after_s: float = 60.0) -> None:
        """An Ingress that went away leaves its channel; dropped once unused for after_s."""
        now = time.monotonic()
        for name, into in list(self.channels.items()):
            if into.unused and now - into.idle_since > after_s:
                del self.channels[name]

    async def end_session(self, session_id: str) -> None:
        await self.engine.end_session(session_id)

    def info(self) -> EngineInfo:
        return EngineInfo(self.engine.max_model_len, self.engine.model_config.vocab_size)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def record_routing_stats(self) -> dict:
        s = self.engine.stats()
        self._drop_unused_channels()  # on the event loop, as generate and outputs use the channels
        await asyncio.to_thread(publish, self.replica, s)  # for `moe-serve status` (a GCS call)
        return {"outstanding_tokens": s.outstanding_tokens, "kv_usage": s.kv_usage, "waiting": s.waiting,
                "alive": self.engine.alive}

    def check_health(self) -> None:
        if not self.engine.alive:
            raise RuntimeError("the engine loop has stopped")

    def __del__(self):
        self.engine.shutdown()
