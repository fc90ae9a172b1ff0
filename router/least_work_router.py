"""LeastWorkRouter: a Ray Serve request router for the engine replicas. Least outstanding work, with session
affinity.

A call naming a replica (`replica=`, its unique id) goes there only. A request with a session goes to the replica that holds the session's pinned history, while that replica is up;
otherwise to the replica with the least work: the tokens it still has to compute (prompts left to prefill plus
tokens left to generate, as it last reported through `record_routing_stats`), plus what this router has sent it
since, then its KV usage. The work sent since the report counts until the request completes, so a burst of
requests spreads out without waiting for the next report. A replica whose engine has stopped (its rebuild failed;
Serve replaces it after its health check) gets nothing while another is up.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica


class LeastWorkRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        self.session_replica: dict[str, ReplicaID] = {}
        self.sent: dict[ReplicaID, int] = {}  # work routed to each replica and not yet completed
        self.in_flight: dict[str, tuple[ReplicaID, int]] = {}  # internal request id -> (replica, work)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        target = replica_of(pending_request)
        if target is not None:  # a call for one replica (EngineServer.outputs): there, or nowhere while it is gone
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        session_id = session_of(pending_request)
        owner = self.session_replica.get(session_id) if session_id else None
        if owner is not None:
            mine = [r for r in candidate_replicas if r.replica_id == owner]
            if mine:
                return [mine]
        alive = [r for r in candidate_replicas if (r.routing_stats or {}).get("alive", True)] or candidate_replicas
        return [[r] for r in sorted(alive, key=self.load)]

    def load(self, replica: RunningReplica) -> tuple[int, float]:
        stats = replica.routing_stats or {}
        return stats.get("outstanding_tokens", 0) + self.sent.get(replica.replica_id, 0), stats.get("kv_usage", 0.0)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        session_id = session_of(pending_request)
        if session_id:
            self.session_replica[session_id] = replica_id
        work = work_of(pending_request)
        if work:
            self.sent[replica_id] = self.sent.get(replica_id, 0) + work
            self.in_flight[pending_request.metadata.internal_request_id] = (replica_id, work)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        routed = self.in_flight.pop(internal_request_id, None)
        if routed is not None:
            replica, work = routed
            self.sent[replica] = max(0, self.sent.get(replica, 0) - work)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for session_id in [s for s, r in self.session_replica.items() if r == replica_id]:
            del self.session_replica[session_id]  # their next turn rebuilds the history elsewhere
        self.sent.pop(replica_id, None)


def replica_of(pending: PendingRequest | None) -> str | None:
    return None if pending is None else pending.kwargs.get("replica")


def session_of(pending: PendingRequest | None) -> str | None:
    return None if pending is None else pending.kwargs.get("session_id")


def work_of(pending: PendingRequest) -> int:
    """A generate call's tokens to compute: its prompt plus what it may generate."""
    prompt, params = pending.kwargs.get("prompt_ids"), pending.kwargs.get("params")
    if prompt is None or params is None:
        return 0
    return len(prompt) + params.max_tokens
