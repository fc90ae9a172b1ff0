"""LeastWorkRouter: a Ray Serve request router for the engine replicas. Least outstanding work, with session
affinity.

A call naming a replica (`replica=`, its unique id) goes there only. A request with a session goes to the replica that holds the session's pinned history, while that replica is up;
otherwise to the replica with the least work: the tokens it still has to compute (prompts left to prefill plus
tokens left to generate, as it last reported through `record_routing_stats`), plus what this router has sent it
since, then its KV usage. The work sent since the report counts until the request completes, so a burst of
requests spreads out without waiting for the next report. Serve routes many requests at once, and awaits between
a choice and the routing (it probes the replica's queue); so a choice reserves the request's work on the replica it
ranks first at once, and the choices made meanwhile see it (without that, a c64 load put all 64 requests on one of
two replicas at times). The routing moves the work to whichever replica took the request; a reservation never
routed (its client left) lapses after RESERVATION_S. A replica whose engine has stopped (its rebuild failed; Serve
replaces it after its health check) gets nothing while another is up.
"""

from __future__ import annotations

import time

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

RESERVATION_S = 10.0  # a choice's reservation counts this long unless the request is routed


class LeastWorkRouter(RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        self.session_replica: dict[str, ReplicaID] = {}
        self.sent: dict[ReplicaID, int] = {}  # work routed to each replica and not yet completed
        self.in_flight: dict[str, tuple[ReplicaID, int]] = {}  # internal request id -> (replica, work)
        self.reserved: dict[str, tuple[ReplicaID, int, float]] = {}  # chosen, not yet routed: (replica, work, until)

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
        now = time.monotonic()
        for rid in [rid for rid, (_, _, until) in self.reserved.items() if until < now]:
            del self.reserved[rid]  # lapsed: never routed
        ranked = sorted(alive, key=self.load)
        self.reserve(pending_request, ranked[0].replica_id)
        return [[r] for r in ranked]

    def load(self, replica: RunningReplica) -> tuple[int, float]:
        stats = replica.routing_stats or {}
        work = stats.get("outstanding_tokens", 0) + self.sent.get(replica.replica_id, 0)
        return work + self.reserved_on(replica.replica_id), stats.get("kv_usage", 0.0)

    def reserve(self, pending: PendingRequest | None, replica_id: ReplicaID) -> None:
        work = work_of(pending) if pending is not None else 0
        if work:
            self.reserved[pending.metadata.internal_request_id] = (replica_id, work, time.monotonic() + RESERVATION_S)

    def reserved_on(self, replica_id: ReplicaID) -> int:
        return sum(work for replica, work, _ in self.reserved.values() if replica == replica_id)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        session_id = session_of(pending_request)
        if session_id:
            self.session_replica[session_id] = replica_id
        self.reserved.pop(pending_request.metadata.internal_request_id, None)
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
        for rid in [rid for rid, (replica, _, _) in self.reserved.items() if replica == replica_id]:
            del self.reserved[rid]


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
