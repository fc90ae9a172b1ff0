"""LeastWorkRouter's choices, driven directly as Serve's routing tasks would call it (no Serve around it)."""

import asyncio
from types import SimpleNamespace

import pytest

from router import least_work_router
from router.least_work_router import LeastWorkRouter


def make_router() -> LeastWorkRouter:
    router = LeastWorkRouter.__new__(LeastWorkRouter)
    router.initialize_state()
    return router


def replica(unique_id: str, **stats):
    return SimpleNamespace(replica_id=unique_id, routing_stats=stats)


def request(n: int, prompt_len: int = 32, max_tokens: int = 64):
    return SimpleNamespace(kwargs={"prompt_ids": [5] * prompt_len, "params": SimpleNamespace(max_tokens=max_tokens)},
                           metadata=SimpleNamespace(internal_request_id=f"req-{n}"))


def first_choice(router: LeastWorkRouter, replicas, pending) -> str:
    return asyncio.run(router.choose_replicas(replicas, pending))[0][0].replica_id


def test_a_burst_chosen_before_any_is_routed_spreads_over_the_replicas():
    router, replicas = make_router(), [replica("r1"), replica("r2")]
    # Serve awaits a queue probe between each choice and its routing: all four are chosen before any is routed
    chosen = [first_choice(router, replicas, request(n)) for n in range(4)]
    assert chosen == ["r1", "r2", "r1", "r2"]


def test_the_routing_moves_the_reserved_work_to_the_replica_that_took_the_request():
    router, replicas = make_router(), [replica("r1"), replica("r2", outstanding_tokens=50)]
    pending = request(0)
    assert first_choice(router, replicas, pending) == "r1"  # reserved on r1 (96 tokens)
    router.on_request_routed(pending, "r2", None)  # r1 was full: Serve sent it to the next rank
    assert router.reserved == {} and router.sent == {"r2": 96}
    assert first_choice(router, replicas, request(1)) == "r1"  # r2: 50 reported + 96 sent
    router.on_request_routed(request(1), "r1", None)
    router.on_request_completed("r2", "req-0")
    assert router.sent == {"r1": 96, "r2": 0}


def test_a_reservation_never_routed_lapses(monkeypatch):
    router, replicas = make_router(), [replica("r1"), replica("r2", outstanding_tokens=10)]
    clock = [100.0]
    monkeypatch.setattr(least_work_router.time, "monotonic", lambda: clock[0])
    assert first_choice(router, replicas, request(0)) == "r1"  # its client leaves before it is routed
    assert first_choice(router, replicas, request(1)) == "r2"  # r1 holds the reservation
    clock[0] += least_work_router.RESERVATION_S + 1
    assert first_choice(router, replicas, request(2)) == "r1"  # both lapsed: r2's reported work counts again
    assert list(router.reserved) == ["req-2"]


@pytest.mark.parametrize("target,chosen", [("r2", ["r2"]), ("gone", [])])
def test_a_call_naming_a_replica_goes_there_only(target, chosen):
    router = make_router()
    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=u), routing_stats={}) for u in ("r1", "r2")]
    got = asyncio.run(router.choose_replicas(replicas, SimpleNamespace(kwargs={"replica": target})))
    assert [[r.replica_id.unique_id for r in group] for group in got] == [chosen]
    assert router.reserved == {}
