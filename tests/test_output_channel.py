"""OutputChannel: an Ingress's outputs on an engine replica, a batch per step, in the order they were put; its reader
goes once no request has been in flight for the linger time, and not before."""

import asyncio

import pytest

from cluster.output_channel import ChannelSink, OutputChannel
from router.request_output import CompletionOutput, RequestOutput


def output(request_id: str, token: int, finished: bool = False) -> RequestOutput:
    sample = CompletionOutput(0, str(token), [token], None, "length" if finished else None)
    return RequestOutput(request_id, [1, 2], [sample], finished, 0)


def test_outputs_come_in_order_a_batch_per_take_and_the_reader_waits_while_a_request_is_in_flight():
    async def run():
        channel = OutputChannel()
        a, b = ChannelSink(channel, "a"), ChannelSink(channel, "b")
        reader = channel.attach()
        channel.begin()
        channel.begin()
        a.put_nowait(output("a", 1))  # before any reader: kept for it
        b.put_nowait(output("b", 2))
        first = await channel.take(reader, linger_s=0.01)
        # requests are in flight: the reader waits past the linger time for what comes next
        later = asyncio.ensure_future(channel.take(reader, linger_s=0.01))
        await asyncio.sleep(0.05)
        assert not later.done()
        a.put_nowait(output("a", 3, finished=True))
        b.put_nowait(ValueError("the step failed"))
        second = await later
        assert a.ended.done() and b.ended.done()
        channel.end()
        channel.end()
        return first, second, await channel.take(reader, linger_s=0.01), channel.unused

    first, second, last, unused = asyncio.run(run())
    assert [(rid, o.outputs[0].token_ids) for rid, o in first] == [("a", [1]), ("b", [2])]
    assert [rid for rid, _ in second] == ["a", "b"] and second[0][1].finished
    assert isinstance(second[1][1], ValueError)
    assert last is None and unused  # nothing in flight for the linger time: the reader goes


def test_the_last_request_ending_wakes_a_waiting_reader():
    async def run():
        channel = OutputChannel()
        reader = channel.attach()
        channel.begin()
        take = asyncio.ensure_future(channel.take(reader, linger_s=0.05))
        await asyncio.sleep(0.2)
        assert not take.done()  # in flight, nothing yet: no timeout
        channel.end()  # aborted: no last output comes, yet the reader must not wait forever
        return await asyncio.wait_for(take, 1.0)

    assert asyncio.run(run()) is None


def test_a_reader_that_another_came_after_takes_nothing_more():
    async def run():
        channel = OutputChannel()
        old = channel.attach()
        channel.begin()
        waiting = asyncio.ensure_future(channel.take(old, linger_s=1.0))
        await asyncio.sleep(0.01)
        new = channel.attach()  # the old one wakes and goes, leaving what comes next to the new one
        gone = await asyncio.wait_for(waiting, 1.0)
        ChannelSink(channel, "r").put_nowait(output("r", 1))
        return gone, await channel.take(old, linger_s=0.01), await channel.take(new, linger_s=0.01)

    gone, old_got, new_got = asyncio.run(run())
    assert gone is None and old_got is None and [rid for rid, _ in new_got] == ["r"]


def test_a_sink_ends_once():
    async def run():
        channel = OutputChannel()
        sink = ChannelSink(channel, "r")
        sink.put_nowait(output("r", 1))
        assert not sink.ended.done()
        sink.put_nowait(output("r", 2, finished=True))
        sink.put_nowait(RuntimeError("late"))  # after the end: kept in order, the end stays the first
        return sink.ended.result(), channel.batch

    result, batch = asyncio.run(run())
    assert result is None and len(batch) == 3


@pytest.mark.parametrize("target,chosen", [("r2", ["r2"]), ("gone", [])])
def test_least_work_router_sends_a_call_naming_a_replica_there_only(target, chosen):
    from types import SimpleNamespace

    from router.least_work_router import LeastWorkRouter

    router = LeastWorkRouter.__new__(LeastWorkRouter)
    router.initialize_state()
    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=u), routing_stats={}) for u in ("r1", "r2")]
    pending = SimpleNamespace(kwargs={"replica": target})
    got = asyncio.run(router.choose_replicas(replicas, pending))
    assert [[r.replica_id.unique_id for r in group] for group in got] == [chosen]
