"""`moe-serve bench` against the real HTTP server over the fake engine, whose every step takes STEP_S: the
latencies it reports must add up to that, its token counts to what was asked, and a bad endpoint must fail fast."""

import argparse
import asyncio
import json
import time
from types import SimpleNamespace

import matplotlib.image
import pytest

from cluster.bench import add_bench_parser
from cluster.load_generator import BenchRequest, LoadGenerator
from router.async_engine import AsyncEngine
from router.engine_config import EngineConfig
from router.llm_engine import LLMEngine, load_tokenizer
from router.openai_server import build_app
from tests.fake_runner import FakeExecutor
from tests.harness import served
from workers.multiproc_executor import free_port

STEP_S = 0.01  # each engine step sleeps this long: a floor under every gap between tokens
N, INPUT_LEN, OUTPUT_LEN = 8, 16, 6


class SlowExecutor(FakeExecutor):
    def execute(self, plans):
        time.sleep(STEP_S)
        return super().execute(plans)


@pytest.fixture(scope="module")
def url(checkpoint_dir):
    model_config = SimpleNamespace(vocab_size=1000, max_position_embeddings=4096, eos_token_ids=())
    engine = AsyncEngine(LLMEngine(EngineConfig(block_size=4), model_config, SlowExecutor(256, 4),
                                   load_tokenizer(checkpoint_dir("v2_lite"))))
    with served(build_app(engine, "fake")) as url:
        yield url
    engine.shutdown()


def bench(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--num-prompts", str(N), "--input-len", str(INPUT_LEN),
                              "--output-len", str(OUTPUT_LEN), "--timeout", "20", *argv])
    return args.func(args)


def strict_json(path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))


def test_sweep_measures_every_request(url, tmp_path, capsys):
    out, plot = tmp_path / "results.json", tmp_path / "plot.png"
    assert bench("--base-url", url + "/v1", "--concurrency", "1,4", "--out", str(out), "--plot", str(plot)) == 0
    report = strict_json(out)
    assert report["model"] == "fake"  # found through GET /v1/models
    assert [r["concurrency"] for r in report["runs"]] == [1, 4]
    for run in report["runs"]:
        assert (run["completed"], run["failed"], run["errors"]) == (N, 0, {})
        assert sum(r["output_tokens"] for r in run["requests"]) == N * OUTPUT_LEN
        assert all(r["prompt_tokens"] == INPUT_LEN for r in run["requests"])
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            s = run[name]
            assert 0 < s["p50"] <= s["p90"] <= s["p99"] and s["mean"] > 0, (name, s)
        # every token costs at least one engine step; in ms, not s
        assert 0.8 * STEP_S * 1e3 <= run["itl_ms"]["p50"] < 2000
        assert all(r["e2e_s"] >= OUTPUT_LEN * STEP_S and r["ttft_s"] >= STEP_S for r in run["requests"])
        assert run["output_tokens_per_s"] == pytest.approx(N * OUTPUT_LEN / run["duration_s"])
    # concurrency c keeps c requests in flight, never more (by the requests' own send and end times, which a pause
    # of the machine does not change; throughput in a half-second run would)
    for run in report["runs"]:
        assert max_in_flight(run["requests"]) == run["concurrency"]
    image = matplotlib.image.imread(plot)
    assert image.shape[0] > 100 and image.shape[1] > 300
    table = capsys.readouterr().out
    assert " concurrency 4, closed loop " in table and "TPOT" in table and "output tok/s" in table


def test_chunks_and_gaps_match_the_usage(url):
    """The stream's own count (one chunk a token here) agrees with the usage, and the gaps fit inside the E2E."""
    gen = LoadGenerator(url)
    requests = [BenchRequest([40 + i] * INPUT_LEN, OUTPUT_LEN) for i in range(3)]
    run = asyncio.run(gen.run("fake", requests, concurrency=3, request_rate=50.0, seed=1))
    assert run.request_rate == 50.0 and len(run.results) == 3
    for r in run.results:
        assert r.error is None and r.output_tokens == OUTPUT_LEN and len(r.itl_s) == OUTPUT_LEN - 1
        assert r.ttft_s + sum(r.itl_s) <= r.e2e_s < run.duration_s
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / (OUTPUT_LEN - 1))


def test_bad_endpoints_fail_fast_and_say_why(url, tmp_path, capsys):
    nothing = f"http://127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    assert bench("--base-url", nothing) == 2  # the model lookup cannot reach it
    assert "cannot reach" in capsys.readouterr().err
    out = tmp_path / "failed.json"
    assert bench("--base-url", nothing, "--model", "fake", "--concurrency", "2", "--out", str(out)) == 1
    (run,) = strict_json(out)["runs"]
    assert (run["completed"], run["failed"]) == (0, N) and run["ttft_ms"] is None
    assert all("Connect" in r["error"] for r in run["requests"])
    assert bench("--base-url", url, "--model", "no-such-model") == 1  # the server refuses each request
    table = capsys.readouterr().out
    assert f"completed 0 of {N}" in table and f"failed: {N} x HTTP 404" in table
    assert time.perf_counter() - t0 < 15


def max_in_flight(requests: list[dict]) -> int:
    """The most requests between their send and their stream's end at any one time (an end before a send at the
    same instant)."""
    events = sorted([(r["sent_s"] + r["e2e_s"], -1) for r in requests] + [(r["sent_s"], 1) for r in requests])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most
