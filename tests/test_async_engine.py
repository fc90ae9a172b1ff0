"""AsyncEngine: streams, early exits that abort, bad requests refused, failures reported, stats."""

import asyncio
import threading
import time

import pytest

from router.async_engine import AsyncEngine, EngineError
from tests.fake_runner import fake_engine
from tests.harness import GREEDY, engine, random_prompts
from workers.sampling_params import SamplingParams


async def collect(eng: AsyncEngine, prompt, params, request_id=None):
    merged = None
    async for out in eng.generate(prompt, params, request_id):
        merged = out if merged is None else merged.merge(out)
    return merged


def test_concurrent_streams_equal_offline_generation(checkpoint_dir):
    d = checkpoint_dir("v2_lite")
    prompts = random_prompts([5, 30, 12, 60], seed=40)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in engine(d).generate(prompts, [params] * 4)]
    texts = [o.outputs[0].text for o in engine(d).generate(prompts, [params] * 4)]
    eng = AsyncEngine(engine(d))

    async def main():
        return await asyncio.gather(*(collect(eng, p, params) for p in prompts))

    try:
        outs = asyncio.run(main())
    finally:
        eng.shutdown()
    assert [o.outputs[0].token_ids for o in outs] == want
    assert [o.outputs[0].text for o in outs] == texts
    assert all(o.finished and o.outputs[0].finish_reason == "length" for o in outs)


def test_leaving_a_stream_aborts_the_request_and_frees_its_blocks():
    core = fake_engine()
    execute = core.executor.execute
    core.executor.execute = lambda plans: time.sleep(0.002) or execute(plans)  # else it all comes as one output
    eng = AsyncEngine(core)

    async def main():
        agen = eng.generate([1, 2, 3], SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True), "long")
        seen = 0
        async for _ in agen:
            seen += 1
            if seen == 3:
                break
        await agen.aclose()
        for _ in range(200):
            if not core.has_unfinished():
                break
            await asyncio.sleep(0.01)
        short = await collect(eng, [4, 5], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
        return seen, short

    try:
        seen, short = asyncio.run(main())
    finally:
        eng.shutdown()
    assert seen == 3 and len(short.outputs[0].token_ids) == 3
    assert not core.has_unfinished() and core.scheduler.blocks.usage == 0.0
    assert eng.stats().running == 0


def test_abort_ends_the_stream_with_abort():
    core = fake_engine()
    gate, execute = threading.Event(), core.executor.execute

    def held(plans):  # from the second step on, the engine waits until the abort is sent (else it may finish)
        if core.executor.rank_steps:
            gate.wait(timeout=30)
        return execute(plans)

    core.executor.execute = held
    eng = AsyncEngine(core)

    async def main():
        agen = eng.generate([1, 2, 3], SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True), "r1")
        first = await agen.__anext__()
        eng.abort("r1")
        gate.set()
        rest = [out async for out in agen]
        return first, rest

    try:
        first, rest = asyncio.run(main())
    finally:
        eng.shutdown()
    assert not first.finished and rest[-1].finished and rest[-1].outputs[-1].finish_reason == "abort"


def test_bad_request_is_refused_before_it_is_queued():
    core = fake_engine()
    eng = AsyncEngine(core)

    async def main():
        with pytest.raises(ValueError, match="the prompt is empty"):
            await collect(eng, [], GREEDY)
        with pytest.raises(ValueError, match="at most"):
            await collect(eng, [1] * 5000, GREEDY)
        return await collect(eng, [1, 2], SamplingParams(max_tokens=2, temperature=0))

    try:
        ok = asyncio.run(main())
    finally:
        eng.shutdown()
    assert len(ok.outputs[0].token_ids) == 2  # the engine kept serving


def test_a_failing_step_errors_its_requests_and_the_engine_goes_on():
    core = fake_engine()
    real_step, calls = core.executor.execute, []

    def flaky(plans):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device lost")
        return real_step(plans)

    core.executor.execute = flaky
    eng = AsyncEngine(core)

    async def main():
        with pytest.raises(EngineError, match="device lost"):
            await collect(eng, [1, 2, 3], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
        return await collect(eng, [1, 2, 3], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))

    try:
        after = asyncio.run(main())
    finally:
        eng.shutdown()
    assert len(after.outputs[0].token_ids) == 5 and core.scheduler.blocks.usage == 0.0


def test_a_worker_lost_while_reporting_ends_no_stream_silently_and_the_rebuilt_engine_takes_requests():
    """The workers' report round (for /metrics) finds a dead worker after a step whose requests finished: those
    still get their outputs, the engine is rebuilt, and with stats refreshed it takes requests again, even though
    the queue was at its limit when the worker died."""
    from workers.executor import WorkerError

    core = fake_engine(max_waiting=1)

    def dead():
        raise WorkerError("worker attention-0 died")

    core.executor.profile = dead
    rebuilt = []

    def rebuild():
        rebuilt.append(fake_engine(max_waiting=1))
        return rebuilt[-1]

    eng = AsyncEngine(core, worker_stats_period_s=0.0, rebuild=rebuild)
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)

    async def main():
        first = await asyncio.wait_for(collect(eng, [1, 2, 3], one), timeout=10)
        return first, await asyncio.wait_for(collect(eng, [4, 5], one), timeout=10)

    try:
        first, second = asyncio.run(main())
    finally:
        eng.shutdown()
    assert first.finished and len(first.outputs[0].token_ids) == 1
    assert rebuilt and second.finished and len(second.outputs[0].token_ids) == 1
    assert eng.stats().waiting == 0


def test_a_builder_runs_on_the_engine_thread_and_its_failure_is_raised():
    built_on = []

    def build():
        built_on.append(threading.current_thread().name)
        return fake_engine()

    eng = AsyncEngine(build)
    try:
        async def main():
            return await collect(eng, [1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))

        assert len(asyncio.run(main()).outputs[0].token_ids) == 3
        assert built_on == [eng._thread.name] == ["engine-loop"]  # the thread that then runs every step
    finally:
        eng.shutdown()

    def broken():
        raise FileNotFoundError("no config.json in /nowhere")

    with pytest.raises(FileNotFoundError, match="/nowhere"):
        AsyncEngine(broken)


def test_one_step_wakes_each_event_loop_once():
    """A step's outputs reach every stream of a loop in one hand-over: one wake-up per step, not per request."""
    core = fake_engine()
    gate, steps = threading.Event(), []
    execute = core.executor.execute

    def gated(plans):
        gate.wait()  # the first step waits until every request is in
        results = execute(plans)
        steps.append(sum(len(r) for r in results))
        return results

    core.executor.execute = gated
    eng = AsyncEngine(core)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    async def main():
        loop = asyncio.get_running_loop()
        calls = []
        original = loop.call_soon_threadsafe

        def counted(callback, *args, **kwargs):
            calls.append(callback.__name__)
            return original(callback, *args, **kwargs)

        loop.call_soon_threadsafe = counted
        streams = [await eng.submit([i + 1, 2, 3], params) for i in range(8)]
        gate.set()

        async def drain(stream):
            return [t async for out in stream for t in out.outputs[0].token_ids]

        return await asyncio.gather(*(drain(s) for s in streams)), calls

    try:
        tokens, calls = asyncio.run(main())
    finally:
        eng.shutdown()
    assert [len(t) for t in tokens] == [4] * 8
    assert max(steps) == 8  # steps that carried all eight requests' tokens...
    assert calls.count("deliver") == len([n for n in steps if n])  # ...each handed over in one call


def test_outputs_that_pile_up_come_merged_and_an_error_after_them():
    core = fake_engine()
    eng = AsyncEngine(core)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    alone = fake_engine().generate([[5, 6, 7]], [params])[0].outputs[0].token_ids

    async def main():
        stream = await eng.submit([5, 6, 7], params)
        for _ in range(500):  # the reader is busy: every step's output waits in its queue
            if stream._queue.qsize() == 12:
                break
            await asyncio.sleep(0.01)
        return [out async for out in stream]

    try:
        outs = asyncio.run(main())
    finally:
        eng.shutdown()
    assert len(outs) == 1 and outs[0].finished  # twelve steps, one message
    assert outs[0].outputs[0].token_ids == alone and outs[0].outputs[0].finish_reason == "length"

    class Failing(Exception):
        pass

    slow = fake_engine()
    execute = slow.executor.execute
    slow.executor.execute = lambda plans: time.sleep(0.002) or execute(plans)  # 100 steps outlast the test
    eng = AsyncEngine(slow)
    try:
        async def failing():
            stream = await eng.submit([1, 2], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True), "r")
            got = [await stream.__anext__()]
            eng._emit("r", got[0])  # two outputs and then an error, all waiting
            eng._emit("r", got[0])
            eng._emit("r", Failing("the step failed"))
            await asyncio.sleep(0.05)
            merged = await stream.__anext__()
            with pytest.raises(Failing):
                await stream.__anext__()
            return got, merged

        got, merged = asyncio.run(failing())
        assert len(merged.outputs[0].token_ids) >= 2 * len(got[0].outputs[0].token_ids)
    finally:
        eng.shutdown()


def test_an_engine_built_but_broken_is_shut_down():
    core = fake_engine()
    shut = []
    core.shutdown = lambda: shut.append(True)

    def stats():
        raise RuntimeError("stats failed")

    core.stats = stats
    with pytest.raises(RuntimeError, match="stats failed"):
        AsyncEngine(lambda: core)
    for _ in range(100):
        if shut:
            break
        time.sleep(0.01)
    assert shut == [True]
