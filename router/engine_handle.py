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
import contextvars
import logging
import uuid

from ray.exceptions import NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import ReplicaUnavailableError

from router.async_engine import EngineLost, OutputStream
from router.engine_stats import EngineStats
from router.request_output import RequestOutput
from router.resumed_sample import ResumedSample
from router.worker_stats import WorkerStats
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineHandle:
    def __init__(self, handle, tokenizer, model_config, max_model_len: int, lost_after_s: float = 30.0):
        """handle: a DeploymentHandle to EngineServer."""
        self.handle = handle
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.lost_after_s = lost_after_s  # a request ended there whose last outputs did not come: it moves on
        self.replica_stats: dict[str, EngineStats] = {}
        self.channel = uuid.uuid4().hex  # this Ingress's, on every replica
        self.inboxes: dict[str, Inbox] = {}  # by the engine's request id
        self.readers: dict[str, asyncio.Task] = {}  # replica -> the task reading its channel
        self.attached: set[str] = set()  # replicas whose channel a reader reads now

    async def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     session_id: str | None = None,
                     resumed: tuple[ResumedSample, ...] = ()) -> RemoteStream:
        # the engine's id is this try's own: outputs of an earlier request under the same id (a client's, over
        # gRPC) that are still on their way cannot reach this one
        engine_id = f"{request_id or 'req'}~{uuid.uuid4().hex[:12]}"
        inbox = self.inboxes[engine_id] = Inbox()  # before the call: outputs may come before the Accepted
        stream = None
        try:
            stream = self.handle.options(stream=True).generate.remote(
                prompt_ids=prompt_ids, params=params, request_id=engine_id, channel=self.channel,
                session_id=session_id, resumed=resumed)
            accepted = await stream.__anext__()
        except BaseException as e:
            if stream is not None:
                stream.cancel()
            self.inboxes.pop(engine_id, None)
            if isinstance(e, (RayTaskError, *REPLICA_LOST)):
                raise replica_error(e) from None
            raise
        self.replica_stats[accepted.replica] = accepted.stats
        inbox.replica = accepted.replica
        self._read(accepted.replica)
        return RemoteStream(self, engine_id, inbox, stream)

    def _read(self, replica: str) -> None:
        """Reads the replica's channel, unless a task does already. The task is nobody's request's: Serve cancels a
        request's calls with it when its client leaves, and this one serves every request there."""
        if replica not in self.readers:
            self.readers[replica] = asyncio.create_task(self._read_channel(replica), context=contextvars.Context())

    def _waiting_on(self, replica: str) -> list[Inbox]:
        return [inbox for inbox in self.inboxes.values() if inbox.replica == replica]

    async def _read_channel(self, replica: str) -> None:
        stream = self.handle.options(stream=True).outputs.remote(channel=self.channel, replica=replica)
        failure: Exception | None = None
        try:
            attach = asyncio.ensure_future(stream.__anext__())  # [] once attached; it may wait for a free slot
            while not (await asyncio.wait({attach}, timeout=1.0))[0]:
                if not self._waiting_on(replica):  # the replica is gone (its requests know) or nothing waits
                    attach.cancel()
                    stream.cancel()
                    return
            attach.result()
            self.attached.add(replica)
            async for batch in stream:
                for request_id, seq, item in batch:
                    inbox = self.inboxes.get(request_id)
                    if inbox is not None and inbox.put(seq, item):  # its last: nothing more to wait for here
                        del self.inboxes[request_id]
        except (RayTaskError, *REPLICA_LOST) as e:
            cause = replica_error(e)  # its death, or what outputs() raised: either way the requests move on
            failure = cause if isinstance(cause, EngineLost) else EngineLost(f"reading the outputs of engine "
                                                                             f"replica {replica} failed: {cause}")
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # this Ingress is stopping
                stream.cancel()
                raise
            failure = EngineLost(f"reading the outputs of engine replica {replica} was cancelled")
        except Exception as e:  # noqa: BLE001 - given to its requests
            log.exception("reading the outputs of engine replica %s failed", replica)
            failure = EngineLost(f"reading the outputs of engine replica {replica} failed: {e}")
        finally:
            self.attached.discard(replica)
            if self.readers.get(replica) is asyncio.current_task():
                del self.readers[replica]
        if failure is not None:
            stream.cancel()
            for inbox in self._waiting_on(replica):
                inbox.queue.put_nowait(failure)
        elif self._waiting_on(replica):  # it ended (no request in flight there) as a request there began: again
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


class Inbox:
    """A request's outputs as its replica's channel hands them in, each numbered: one missing (its batch went
    with a reader that failed) ends the stream with EngineLost, and the request moves on from what came."""

    def __init__(self):
        self.replica = ""  # known once it is accepted
        self.queue: asyncio.Queue = asyncio.Queue()
        self.next = 0

    def put(self, seq: int, item) -> bool:
        """Whether that was its last."""
        if seq != self.next:
            item = EngineLost(f"outputs {self.next}..{seq - 1} of this request on engine replica {self.replica} "
                              "were lost")
        self.next = seq + 1
        self.queue.put_nowait(item)
        return isinstance(item, Exception) or item.finished


class RemoteStream(OutputStream):
    """A request's outputs from its replica's channel. Its own Ray stream is watched for the replica's death (then
    EngineLost follows the outputs that came before it); closing before the end cancels that stream, which aborts
    the request on the replica."""

    def __init__(self, engine: EngineHandle, request_id: str, inbox: Inbox, stream):
        super().__init__(inbox.queue, self._closed)
        self.engine, self.request_id, self.inbox, self.stream = engine, request_id, inbox, stream
        self.replica = inbox.replica
        self.watch = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        try:
            async for _ in self.stream:  # nothing more comes: it ends with the request
                pass
        except (RayTaskError, *REPLICA_LOST) as e:
            self.inbox.queue.put_nowait(replica_error(e))
            return
        except Exception:  # noqa: BLE001 - cancelled from here (the request was left or moved)
            return
        # ended: its last output went into the channel before; should it not come while the channel is read, the
        # request moves on
        waited = 0.0
        while self.engine.inboxes.get(self.request_id) is self.inbox:  # not yet
            if waited > self.engine.lost_after_s:
                self.inbox.queue.put_nowait(EngineLost(f"the last outputs of this request on engine replica "
                                                       f"{self.replica} did not come in {waited:.0f} s"))
                return
            await asyncio.sleep(0.05)
            waited = waited + 0.05 if self.replica in self.engine.attached else 0.0

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
