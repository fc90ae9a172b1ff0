"""Request migration: a request whose engine is lost goes on, on another engine, from the tokens it had; its
consumer sees the stream it would have seen without the fault (tokens, text, seeded draws, penalties)."""

import asyncio

import pytest

from router.async_engine import AsyncEngine, EngineError, EngineLost
from router.frontend import Frontend
from router.migrating_stream import MigratingStream
from router.request_output import CompletionOutput, RequestOutput
from router.resumed_sample import ResumedSample
from router.session_store import SessionStore
from tests.fake_runner import fake_engine
from tests.harness import engine, random_prompts
from workers.executor import WorkerError
from workers.sampling_params import SamplingParams

SAMPLED = SamplingParams(n=3, max_tokens=24, temperature=0.9, top_p=0.95, seed=11, frequency_penalty=0.4,
                         repetition_penalty=1.1, stop=("zzz",), ignore_eos=True)


def merged_by_sample(outputs: list[RequestOutput]) -> dict[int, CompletionOutput]:
    out = outputs[0]
    for later in outputs[1:]:
        out = out.merge(later)
    return {c.index: c for c in out.outputs}


def test_resumed_samples_go_on_exactly_as_unbroken(checkpoint_dir):
    """Samples begun on one engine and taken over by a fresh one mid-way (seeded, penalized, with text held back
    for a stop string): each sample's tokens and text equal those of the run that was never interrupted."""
    d = checkpoint_dir("v2_lite")
    prompt = random_prompts([40], seed=5)[0]
    (whole,) = engine(d).generate([prompt], [SAMPLED])
    want = {c.index: c for c in whole.outputs}

    first = engine(d)
    first.add_request(prompt, SAMPLED, "r")
    before: list[RequestOutput] = []
    while sum(len(c.token_ids) for o in before for c in o.outputs) < 20:  # a few tokens of each sample
        before += first.step()
    progress = merged_by_sample(before)
    assert all(0 < len(c.token_ids) < SAMPLED.max_tokens for c in progress.values())
    resumed = tuple(ResumedSample(i, c.token_ids, len(c.text)) for i, c in progress.items())
    second = engine(d)
    second.add_request(prompt, SAMPLED, "r.1", resumed=resumed)
    after: list[RequestOutput] = []
    while second.has_unfinished():
        after += second.step()
    rest = merged_by_sample(after)
    for i in range(SAMPLED.n):
        assert progress[i].token_ids + rest[i].token_ids == want[i].token_ids, i
        assert progress[i].text + rest[i].text == want[i].text, i
        assert rest[i].finish_reason == want[i].finish_reason
    assert second.requests == {} and second.scheduler.blocks.usage == 0.0


def test_a_resumed_sample_that_does_not_fit_is_refused():
    core = fake_engine()
    params = SamplingParams(max_tokens=4, temperature=0)
    with pytest.raises(ValueError, match="resumed sample 0"):
        core.add_request([1, 2], params, resumed=(ResumedSample(0, [5, 6, 7, 8], 0),))  # already at max_tokens
    with pytest.raises(ValueError, match="resumed sample 2"):
        core.add_request([1, 2], params, resumed=(ResumedSample(2, [5], 0),))  # n is 1


def lose_workers_at(core, step: int):
    """core's executor dies (WorkerError) at its step-th step."""
    execute, calls = core.executor.execute, []

    def dying(plans):
        calls.append(1)
        if len(calls) == step:
            raise WorkerError("worker moe-serve/r/expert-0 died")
        return execute(plans)

    core.executor.execute = dying


async def stream_all(front: Frontend, prompt, params):
    (outputs,), _ = await front.submit([prompt], params, "req")
    got = [out async for out in outputs]
    return got, outputs


def test_a_stream_whose_workers_die_goes_on_unbroken_after_the_rebuild():
    """Through the front door: the engine loses its workers at the 6th step and is rebuilt; the request moves onto
    the rebuilt engine with its tokens, and the client's stream is the one a healthy engine gives (seeded
    sampling, two samples), with no error in it."""
    params = SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=3, ignore_eos=True)
    prompt = [3, 1, 4, 1, 5]
    healthy = AsyncEngine(fake_engine())
    try:
        want, _ = asyncio.run(stream_all(Frontend(healthy, "m", SessionStore()), prompt, params))
    finally:
        healthy.shutdown()

    core = fake_engine()
    lose_workers_at(core, 6)
    eng = AsyncEngine(core, rebuild=fake_engine)
    try:
        got, outputs = asyncio.run(stream_all(Frontend(eng, "m", SessionStore()), prompt, params))
    finally:
        eng.shutdown()
    assert outputs.migrations == 1
    assert merged_by_sample(got) == merged_by_sample(want)
    assert got[-1].finished


class Dies:
    """An engine's stream that yields its items, then loses its engine."""

    def __init__(self, items):
        self.items = list(items)

    async def __anext__(self):
        if self.items:
            return self.items.pop(0)
        raise EngineLost("the engine replica running this request died: ActorDiedError")

    async def aclose(self):
        pass


def token(t: int, finish: str | None = None) -> RequestOutput:
    return RequestOutput("r", [1], [CompletionOutput(0, chr(ord("a") + t), [t], None, finish)], finish is not None, 0)


def drain(stream_or_open):
    async def run():
        stream = await stream_or_open
        return [out async for out in stream], stream
    return asyncio.run(run())


def test_a_request_no_engine_takes_back_ends_with_a_clear_error():
    """The engine is lost and nothing takes the request back in time: the stream ends with an EngineError saying
    so (it does not hang); so does a request moved too often, or lost again before it made any progress (it may be
    what kills the engines)."""
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    tries = []

    async def nobody(resumed, attempt):
        tries.append(attempt)
        if attempt == 0:
            return Dies([token(7)])
        assert resumed == (ResumedSample(0, [7], 1),)  # the progress travels with the request
        raise EngineLost("the engine stopped: no room")

    with pytest.raises(EngineError, match="no engine took the request back within 0.3 s: the engine stopped"):
        drain(MigratingStream.open(nobody, params, timeout_s=0.3))
    assert len(tries) > 2 and len(set(tries)) == len(tries)  # every try under an id of its own

    async def one_more_token(resumed, attempt):
        return Dies([token(len(resumed[0].token_ids) if resumed else 0)])

    with pytest.raises(EngineError, match="moved 2 times already; given up"):
        drain(MigratingStream.open(one_more_token, params, max_migrations=2))

    async def dies_at_once(resumed, attempt):
        return Dies([])

    with pytest.raises(EngineError, match="before the request made any progress since its last move"):
        drain(MigratingStream.open(dies_at_once, params))


def test_an_engine_lost_after_the_last_output_changes_nothing():
    """The request's last output came, then its replica died before the stream's end: no move, nothing twice."""
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    submitted = []

    async def submit(resumed, attempt):
        submitted.append(resumed)
        return Dies([token(1), token(2, "length")])

    outs, stream = drain(MigratingStream.open(submit, params))
    assert [o.outputs[0].token_ids for o in outs] == [[1], [2]] and outs[-1].finished
    assert submitted == [()] and stream.migrations == 0


def test_an_engine_lost_at_the_first_submission_is_a_move():
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)

    async def submit(resumed, attempt):
        if attempt == 0:
            raise EngineLost("the engine replica running this request died: ActorDiedError")
        return Dies([token(1), token(2, "length")])

    outs, stream = drain(MigratingStream.open(submit, params))
    assert outs[-1].finished and stream.migrations == 1


def test_a_dead_replica_is_an_engine_lost_and_a_refusal_is_itself():
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    from router.engine_handle import replica_error

    for dead in (ActorDiedError(), ActorUnavailableError("unreachable", None)):
        assert isinstance(replica_error(dead), EngineLost)

    class TaskError(Exception):  # a RayTaskError carries what the replica raised as .cause
        def __init__(self, cause):
            self.cause = cause

    assert isinstance(replica_error(TaskError(ActorDiedError())), EngineLost)
    refusal = ValueError("the prompt is empty")
    assert replica_error(TaskError(refusal)) is refusal
