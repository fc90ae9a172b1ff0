"""OutputChannel: an Ingress's outputs on an engine replica, a batch per step, in the order they were put; its reader
goes once no request has been in flight for the linger time, and not before."""

import asyncio
import time

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
        assert a.ended.is_set() and b.ended.is_set()
        channel.end()
        channel.end()
        last = await channel.take(reader, linger_s=0.01)
        held = not channel.unused  # a reader attached holds it
        channel.detach()  # as EngineServer.outputs does once its take gave None
        return first, second, last, held and channel.unused

    first, second, last, unused = asyncio.run(run())
    assert [(rid, seq, o.outputs[0].token_ids) for rid, seq, o in first] == [("a", 0, [1]), ("b", 0, [2])]
    assert [(rid, seq) for rid, seq, _ in second] == [("a", 1), ("b", 1)] and second[0][2].finished
    assert isinstance(second[1][2], ValueError)
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
    assert gone is None and old_got is None and [rid for rid, _, _ in new_got] == ["r"]


def test_a_sink_ends_once():
    async def run():
        channel = OutputChannel()
        sink = ChannelSink(channel, "r")
        sink.put_nowait(output("r", 1))
        assert not sink.ended.is_set()
        sink.put_nowait(output("r", 2, finished=True))
        sink.put_nowait(RuntimeError("late"))  # after the end: kept in order
        return sink.ended.is_set(), channel.batch

    finished, batch = asyncio.run(run())
    assert finished and len(batch) == 3


def serving(core):
    """An EngineServer over the fake engine, without Serve around it."""
    from cluster.engine_server import EngineServer
    from router.async_engine import AsyncEngine

    server = EngineServer.__new__(EngineServer)
    server.replica, server.engine, server.channels = "r1", AsyncEngine(core), {}
    return server


def test_a_request_whose_stream_is_cancelled_is_aborted_and_a_finished_one_goes_through_its_channel():
    from tests.fake_runner import fake_engine
    from workers.sampling_params import SamplingParams

    core = fake_engine()
    execute = core.executor.execute
    core.executor.execute = lambda plans: time.sleep(0.01) or execute(plans)  # the long one would take seconds
    server = serving(core)
    long = SamplingParams(max_tokens=core.max_model_len - 3, temperature=0, ignore_eos=True)

    async def run():
        gen = server.generate([1, 2, 3], long, "left", channel="c")
        accepted = await gen.__anext__()
        rest = asyncio.ensure_future(gen.__anext__())  # waits for the request's end
        await asyncio.sleep(0.05)
        assert core.has_unfinished()
        rest.cancel()  # what Serve does when the Ingress cancels the stream: the client left
        with pytest.raises(asyncio.CancelledError):
            await rest
        for _ in range(30):  # a few steps, not the rest of its tokens
            if not core.has_unfinished():
                break
            await asyncio.sleep(0.01)
        aborted = not core.has_unfinished()
        short = server.generate([1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), "done",
                                channel="c")
        await short.__anext__()
        with pytest.raises(StopAsyncIteration):  # ends with the request
            await asyncio.wait_for(short.__anext__(), 5)
        return accepted, aborted, [(rid, seq) for rid, seq, _ in server.channels["c"].batch if rid == "done"]

    try:
        accepted, aborted, items = asyncio.run(run())
    finally:
        server.engine.shutdown()
    assert accepted.replica == "r1" and aborted
    assert items and [seq for _, seq in items] == list(range(len(items)))
    assert server.channels["c"].requests == 0
