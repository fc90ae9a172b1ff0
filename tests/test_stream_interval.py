"""--stream-interval: a request's outputs are held and merged between its first and its last, never lost or
reordered, and the HTTP stream carries the same text and tokens in fewer chunks."""

import httpx
import pytest

from router.async_engine import AsyncEngine
from router.engine_config import EngineConfig
from router.openai_server import build_app
from router.stream_interval import StreamInterval
from tests.fake_runner import fake_engine
from tests.harness import served, sse_events
from workers.sampling_params import SamplingParams


def run(engine, prompts, params) -> dict[str, list]:
    """Every step's outputs, per request, until all finish."""
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    streamed: dict[str, list] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            streamed[out.request_id].append(out)
    return streamed


def tokens(outputs, index: int = 0) -> list[int]:
    return [t for out in outputs for o in out.outputs if o.index == index for t in o.token_ids]


@pytest.mark.parametrize("interval", [2, 3, 5])
def test_outputs_come_first_then_every_interval_then_last(interval):
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (10, 7, 1)]
    every_step = run(fake_engine(), prompts, params)
    held = run(fake_engine(stream_interval=interval), prompts, params)
    for (rid, ref), got in zip(every_step.items(), held.values()):
        assert tokens(got) == tokens(ref)  # the same tokens, in order
        assert [len(o.outputs[0].token_ids) for o in ref] == [1] * len(ref)
        sizes = [len(o.outputs[0].token_ids) for o in got]
        assert sizes[0] == 1  # the first token is not held (time to first token)
        assert all(s == interval for s in sizes[1:-1])
        assert 1 <= sizes[-1] <= interval if len(sizes) > 1 else True
        assert got[-1].finished and not any(o.finished for o in got[:-1])
        assert got[-1].outputs[0].finish_reason == "length"
        assert len(got) == 1 + -(-(len(ref) - 1) // interval)


def test_n_samples_are_merged_per_sample():
    params = SamplingParams(max_tokens=6, n=2, temperature=1.0, seed=7, ignore_eos=True)
    (ref,) = run(fake_engine(), [[3, 1, 4]], [params]).values()
    (got,) = run(fake_engine(stream_interval=4), [[3, 1, 4]], [params]).values()
    assert len(got) < len(ref)
    for index in (0, 1):
        assert tokens(got, index) == tokens(ref, index) and len(tokens(ref, index)) == 6
    assert tokens(ref, 0) != tokens(ref, 1)  # two samples, told apart
    assert {o.finish_reason for o in got[-1].outputs} == {"length"}


def test_an_aborted_request_leaves_nothing_held():
    engine = fake_engine(stream_interval=4)
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    for _ in range(3):
        engine.step()  # the first token went out, two are held
    assert engine.abort(rid).outputs[0].finish_reason == "abort"
    assert engine.stream._held == {} and engine.stream._started == set()
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), request_id=rid)
    first = engine.step()  # the id, reused, starts afresh: its first token goes out at once
    assert [len(o.outputs[0].token_ids) for o in first] == [1]


def test_interval_below_one_is_refused():
    with pytest.raises(ValueError, match="stream_interval"):
        StreamInterval(0)
    with pytest.raises(ValueError, match="stream_interval"):
        EngineConfig(stream_interval=0)


def test_http_stream_carries_the_same_text_in_fewer_chunks(checkpoint_dir):
    from router.llm_engine import LLMEngine

    d = str(checkpoint_dir("v2_lite"))
    body = {"model": "m", "prompt": "def fib(n):", "max_tokens": 20, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    streams = {}
    for interval in (1, 4):
        engine = AsyncEngine(LLMEngine.from_config(EngineConfig(model=d, dtype="float32", kv_cache_gib=0.05,
                                                                max_model_len=256, stream_interval=interval)))
        try:
            with served(build_app(engine, "m")) as url, \
                    httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
                assert r.status_code == 200
                streams[interval] = list(sse_events(r))
        finally:
            engine.shutdown()
    chunks = {k: [e for e in v if e["choices"]] for k, v in streams.items()}
    text = {k: "".join(e["choices"][0]["text"] for e in v) for k, v in chunks.items()}
    assert text[4] == text[1] and text[1]
    assert streams[4][-1]["usage"]["completion_tokens"] == streams[1][-1]["usage"]["completion_tokens"] == 20
    # Interval 4 sends at most the first token, one chunk per 4 steps after it and the last. Interval 1 sends one
    # per token unless outputs piled up behind a busy reader and were merged, so only "more than interval 4" holds.
    most_at_4 = 2 + -(-19 // 4)
    assert len(chunks[4]) <= most_at_4 < len(chunks[1]) <= 20
