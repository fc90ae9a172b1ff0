"""EngineHandle: the engine replicas of a Ray Serve app, seen by the front doors as one engine (AsyncEngine's face:
submit, stats, end_session, tokenizer, model_config, max_model_len).

Each request goes through a Serve DeploymentHandle, which LeastWorkRouter points at the replica with the least
work, or at the one holding the request's session. submit() waits for the replica's Accepted (or its refusal,
raised here as ValueError or EngineBusy) before returning the stream. Stats are the sum of what each replica last
reported with an Accepted.

The outputs come over one stream per replica, this Ingress's channel there (EngineServer.outputs): a batch per
step for all of its requests on that replica, handed to each request's inbox. The request's own stream only ends,
or fails: the replica's death reaches each of its requests as EngineLost, after the outputs that came before it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from ray.exceptions import NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import ReplicaUnavailableError

from router.async_engine import EngineError, EngineLost, OutputStream
from router.engine_stats import EngineStats
from router.request_output import RequestOutput
from router.resumed_sample import ResumedSample
from router.worker_stats import WorkerStats
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineHandle:
    def __init__(self, handle, tokenizer, model_config, max_model_len: int, attach_timeout_s: float = 30.0):
        """handle: a DeploymentHandle to EngineServer."""
        self.handle = handle
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.attach_timeout_s = attach_timeout_s  # to start reading a replica's channel
        self.replica_stats: dict[str, EngineStats] = {}
        self.channel = uuid.uuid4().hex  # this Ingress's, on every replica
        self.inboxes: dict[str, tuple[str, asyncio.Queue]] = {}  # request id -> (replica, its outputs)
        self.readers: dict[str, asyncio.Task] = {}  # replica -> the task reading its channel

    async def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     session_id: str | None = None,
                     resumed: tuple[ResumedSample, ...] = ()) -> RemoteStream:
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.inboxes:
            raise ValueError(f"request id {request_id!r} is already in flight")
        inbox: asyncio.Queue = asyncio.Queue()
        self.inboxes[request_id] = ("", inbox)  # before the call: its first outputs may come before its Accepted
        stream = self.handle.options(stream=True).generate.remote(prompt_ids=prompt_ids, params=params,
                                                                  request_id=request_id, channel=self.channel,
                                                                  session_id=session_id, resumed=resumed)
        try:
            accepted = await stream.__anext__()
        except BaseException as e:
            stream.cancel()
            self.inboxes.pop(request_id, None)
            if isinstance(e, (RayTaskError, *REPLICA_LOST)):
                raise replica_error(e) from None
            raise
        self.replica_stats[accepted.replica] = accepted.stats
        self.inboxes[request_id] = (accepted.replica, inbox)
        self._read(accepted.replica)
        return RemoteStream(self, request_id, inbox, stream, accepted.replica)

    def _read(self, replica: str) -> None:
        """Reads the replica's channel, unless a task does already."""
        if replica not in self.readers:
            self.readers[replica] = asyncio.create_task(self._read_channel(replica))

    async def _read_channel(self, replica: str) -> None:
        stream = self.handle.options(stream=True).outputs.remote(channel=self.channel, replica=replica)
        failure: Exception | None = None
        try:
            await asyncio.wait_for(stream.__anext__(), self.attach_timeout_s)  # [] once attached
            async for batch in stream:
                for request_id, item in batch:
                    target = self.inboxes.get(request_id)
                    if target is not None:
                        target[1].put_nowait(item)
                        if isinstance(item, Exception) or item.finished:  # its last: nothing more to wait for here
                            del self.inboxes[request_id]
        except (RayTaskError, *REPLICA_LOST) as e:
            failure = replica_error(e)
        except asyncio.TimeoutError:
            failure = EngineLost(f"the outputs of engine replica {replica} could not be read: it did not answer "
                                 f"in {self.attach_timeout_s:g} s")
        except asyncio.CancelledError:
            stream.cancel()
            raise
        except Exception as e:  # noqa: BLE001 - given to its requests
            log.exception("reading the outputs of engine replica %s failed", replica)
            failure = EngineError(f"reading the outputs of engine replica {replica} failed: {e}")
        finally:
            if self.readers.get(replica) is asyncio.current_task():
                del self.readers[replica]
        waiting = [inbox for home, inbox in self.inboxes.values() if home == replica]
        if failure is not None:
            stream.cancel()
            for inbox in waiting:
                inbox.put_nowait(failure if isinstance(failure, EngineLost) else EngineLost(str(failure)))
        elif waiting:  # it ended (no request in flight there) as a request there began: read again
            self._read(replica)

    def stats(self) -> EngineStats:
        """Summed over the replicas, as each last reported."""
        stats = list(self.replica_stats.values())
        if not stats:
            return EngineStats(0, 0, 0.0, 0.0, 0, 1, 1)
        total = stats[0]
        for s in stats[1:]:
            total = total.plus(s)
        return total

    def worker_stats(self) -> dict[str, WorkerStats]:
        """Per expert and per worker, by replica, as each last reported."""
        return {replica: s.workers for replica, s in self.replica_stats.items() if s.workers is not None}

    async def end_session(self, session_id: str) -> None:
        await self.handle.end_session.remote(session_id=session_id)


class RemoteStream(OutputStream):
    """A request's outputs from its replica's channel. Its own Ray stream is watched for the replica's death (then
    EngineLost follows the outputs that came before it); closing before the end cancels that stream, which aborts
    the request on the replica."""

    def __init__(self, engine: EngineHandle, request_id: str, inbox: asyncio.Queue, stream, replica: str):
        super().__init__(inbox, self._closed)
        self.engine, self.request_id, self.stream, self.replica = engine, request_id, stream, replica
        self.watch = asyncio.create_task(self._watch(inbox))

    async def _watch(self, inbox: asyncio.Queue) -> None:
        try:
            async for _ in self.stream:  # nothing more comes: it ends with the request
                pass
        except (RayTaskError, *REPLICA_LOST) as e:
            inbox.put_nowait(replica_error(e))
            return
        # ended: its last output went into the channel before; should it never come, the request moves on
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.engine.attach_timeout_s
        while self.engine.inboxes.get(self.request_id, (None, None))[1] is inbox:  # not yet
            if loop.time() > deadline:
                inbox.put_nowait(EngineLost(f"the last outputs of this request on engine replica {self.replica} "
                                            f"did not come in {self.engine.attach_timeout_s:g} s"))
                return
            await asyncio.sleep(0.05)

    async def __anext__(self) -> RequestOutput:
        try:
            return await super().__anext__()
        except EngineLost:  # the request may still run there (its outputs could not be read): it goes
            self.stream.cancel()
            raise

    def _closed(self, ended: bool) -> None:
        self.engine.inboxes.pop(self.request_id, None)
        if not ended:
            self.stream.cancel()
            self.watch.cancel()


REPLICA_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ReplicaUnavailableError)  # the replica died


def replica_error(e: Exception) -> Exception:
    """What the replica raised (EngineError, ValueError, EngineBusy), without the Ray traceback around it; its
    death as EngineLost (the request may go on elsewhere)."""
    cause = getattr(e, "cause", None)
    lost = e if isinstance(e, REPLICA_LOST) else cause if isinstance(cause, REPLICA_LOST) else None
    if lost is not None:
        return EngineLost(f"the engine replica running this request died: {type(lost).__name__}")
    return cause if isinstance(cause, Exception) else e
