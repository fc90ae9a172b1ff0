"""EngineHandle: the engine replicas of a Ray Serve app, seen by the front doors as one engine (AsyncEngine's face:
submit, stats, end_session, tokenizer, model_config, max_model_len).

Each request goes through a Serve DeploymentHandle, which LeastWorkRouter points at the replica with the least
work, or at the one holding the request's session. submit() waits for the replica's Accepted (or its refusal,
raised here as ValueError or EngineBusy) before returning the stream. Stats are the sum of what each replica last
reported with an Accepted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray.exceptions import NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import ReplicaUnavailableError

from router.async_engine import EngineLost
from router.engine_stats import EngineStats
from router.request_output import RequestOutput
from router.resumed_sample import ResumedSample
from router.worker_stats import WorkerStats
from workers.sampling_params import SamplingParams


class EngineHandle:
    def __init__(self, handle, tokenizer, model_config, max_model_len: int):
        """handle: a DeploymentHandle to EngineServer."""
        self.handle = handle
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.replica_stats: dict[str, EngineStats] = {}

    async def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     session_id: str | None = None,
                     resumed: tuple[ResumedSample, ...] = ()) -> AsyncIterator[RequestOutput]:
        stream = self.handle.options(stream=True).generate.remote(prompt_ids=prompt_ids, params=params,
                                                                  request_id=request_id, session_id=session_id,
                                                                  resumed=resumed)
        try:
            accepted = await stream.__anext__()
        except (RayTaskError, *REPLICA_LOST) as e:
            stream.cancel()
            raise replica_error(e) from None
        except BaseException:
            stream.cancel()
            raise
        self.replica_stats[accepted.replica] = accepted.stats
        return RemoteStream(stream, accepted.replica)

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


class RemoteStream:
    """A replica's output stream; closing it before the end cancels the replica's generator, aborting the request."""

    def __init__(self, stream, replica: str):
        self.stream = stream
        self.replica = replica
        self.done = False

    def __aiter__(self) -> "RemoteStream":
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            out = await self.stream.__anext__()
        except StopAsyncIteration:
            self.done = True
            raise
        except (RayTaskError, *REPLICA_LOST) as e:
            await self.aclose()
            raise replica_error(e) from None
        except BaseException:
            await self.aclose()
            raise
        if out.finished:
            self.done = True
        return out

    async def aclose(self) -> None:
        if not self.done:
            self.done = True
            self.stream.cancel()

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.stream.cancel()


REPLICA_LOST = (RayActorError, WorkerCrashedError, NodeDiedError, ReplicaUnavailableError)  # the replica died


def replica_error(e: Exception) -> Exception:
    """What the replica raised (EngineError, ValueError, EngineBusy), without the Ray traceback around it; its
    death as EngineLost (the request may go on elsewhere)."""
    cause = getattr(e, "cause", None)
    lost = e if isinstance(e, REPLICA_LOST) else cause if isinstance(cause, REPLICA_LOST) else None
    if lost is not None:
        return EngineLost(f"the engine replica running this request died: {type(lost).__name__}")
    return cause if isinstance(cause, Exception) else e
