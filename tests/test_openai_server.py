"""The OpenAI-compatible HTTP server, driven by the official `openai` client and by raw HTTP for bad input."""

import json
import time

import httpx
import openai
import pytest

from router.async_engine import AsyncEngine
from router.engine_config import EngineConfig
from router.llm_engine import LLMEngine
from router.openai_server import build_app
from tests.harness import hf_greedy, hf_model, parsed, served

MODEL = "tiny-deepseek-v2"


@pytest.fixture(scope="module")
def server(checkpoint_dir):
    d = checkpoint_dir("v2_lite")
    core = LLMEngine.from_config(EngineConfig(model=str(d), dtype="float32", kv_cache_gib=0.05, max_model_len=512))
    engine = AsyncEngine(core)
    with served(build_app(engine, MODEL)) as url:
        yield {"url": url, "client": openai.OpenAI(base_url=f"{url}/v1", api_key="none"), "dir": d, "engine": engine}
    engine.shutdown()


def text_of(server, token_ids: list[int]) -> str:
    """What the server should stream for these tokens: no special tokens, no half-arrived last character."""
    tokenizer = server["engine"].engine.tokenizer
    return tokenizer.decode(token_ids, skip_special_tokens=True).removesuffix("\ufffd")


def test_models_and_health(server):
    assert [m.id for m in server["client"].models.list().data] == [MODEL]
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}


def test_completion_equals_transformers_greedy(server):
    client, d = server["client"], server["dir"]
    ids = httpx.post(server["url"] + "/tokenize", json={"prompt": "def add(a, b):"}).json()["tokens"]
    out = client.completions.create(model=MODEL, prompt="def add(a, b):", max_tokens=10, temperature=0,
                                    extra_body={"ignore_eos": True})
    want = hf_greedy(hf_model(d), ids, 10)
    assert out.choices[0].text == text_of(server, want) and out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == 10
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert by_ids.choices[0].text == out.choices[0].text


def test_completion_list_of_prompts_n_logprobs_and_echo(server):
    client = server["client"]
    out = client.completions.create(model=MODEL, prompt=["ab", "cd"], max_tokens=4, n=2, temperature=0.9,
                                    seed=3, logprobs=2, echo=True, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert all(c.text.startswith("ab") for c in out.choices if c.index < 2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4 and all(len(t) <= 2 for t in lp.top_logprobs)
    assert out.usage.completion_tokens == 16


def test_streaming_completion_equals_the_whole_one(server):
    client = server["client"]
    kw = dict(model=MODEL, prompt="x = ", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_chat_uses_the_template_and_streams(server):
    client, d = server["client"], server["dir"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "sort a list"}]
    ids = httpx.post(server["url"] + "/tokenize", json={"messages": messages}).json()["tokens"]
    text = httpx.post(server["url"] + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text.endswith("User: sort a list\n\nAssistant:")  # no space after "Assistant:"
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                         logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    assert out.choices[0].message.content == text_of(server, hf_greedy(hf_model(d), ids, 8))
    assert out.usage.prompt_tokens == len(ids) and len(out.choices[0].logprobs.content) == 8
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("body, status, says", [
    ('{"prompt": "hi", "max_tokens": 4', 400, "JSON"),
    ('{"prompt": 5}', 400, "prompt"),
    ('{"prompt": "hi", "max_tokens": -1}', 400, "max_tokens must be >= 1"),
    ('{"prompt": "hi", "max_tokens": 100000}', 400, "leaves room for"),
    ('{"prompt": "hi", "temperature": -1}', 400, "temperature"),
    ('{"prompt": "hi", "model": "gpt-4"}', 404, "does not exist"),
    ('{"prompt": []}', 400, "empty"),
    ('{"prompt": [1, 2, 99999]}', 400, "token ids must be in"),
    ('{"prompt": [5, 6], "suffix": "x"}', 400, "must be text"),
])
def test_bad_completion_requests_get_a_4xx_that_says_what_to_fix(server, body, status, says):
    r = httpx.post(server["url"] + "/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert says in r.json()["error"]["message"]


@pytest.mark.parametrize("body, says", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "logprobs"),
    ({"messages": [{"role": "user", "content": "x" * 600}]}, "context"),
])
def test_bad_chat_requests_get_a_400(server, body, says):
    r = httpx.post(server["url"] + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"]


def test_a_client_that_leaves_a_stream_aborts_its_generation(server):
    core = server["engine"].engine
    with httpx.stream("POST", server["url"] + "/v1/completions",
                      json={"prompt": "x", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
                            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                json.loads(line[6:])
                break  # leave after the first chunk
    for _ in range(100):
        if not core.has_unfinished():
            break
        time.sleep(0.05)
    assert not core.has_unfinished()


def test_fill_in_the_middle_with_suffix(server):
    client, core = server["client"], server["engine"].engine
    out = client.completions.create(model=MODEL, prompt="def f(x):\n    ", suffix="\n    return y", max_tokens=6,
                                    temperature=0, extra_body={"ignore_eos": True})
    fim = core.tokenizer.encode("<｜fim▁begin｜>def f(x):\n    <｜fim▁hole｜>\n    return y<｜fim▁end｜>")
    assert fim[0] == 256 and out.usage.prompt_tokens == len(fim)
    plain = client.completions.create(model=MODEL, prompt=fim, max_tokens=6, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert out.choices[0].text == plain.choices[0].text


def test_metrics_use_vllm_names_under_our_prefix(server):
    server["client"].completions.create(model=MODEL, prompt="a", max_tokens=3, temperature=0,
                                        extra_body={"ignore_eos": True})
    text = httpx.get(server["url"] + "/metrics").text
    series = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    label = f'{{model_name="{MODEL}"}}'
    assert series[f'moe_serve:request_success_total{{finished_reason="length",model_name="{MODEL}"}}'] >= 1
    assert series[f"moe_serve:generation_tokens_total{label}"] >= 3
    assert series[f"moe_serve:time_to_first_token_seconds_count{label}"] >= 1
    assert series[f"moe_serve:e2e_request_latency_seconds_count{label}"] >= 1
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hit_rate"):
        assert f"moe_serve:{gauge}{label}" in series
    config = server["engine"].model_config
    experts = {labels["expert"]: value for name, labels, value in parsed(text) if name == "moe_serve:expert_tokens_total"}
    assert sorted(experts, key=int) == [str(e) for e in range(config.n_routed_experts)]
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    routed = sum(experts.values())  # each token goes to top-k experts in every MoE layer
    assert routed > 0 and routed % (config.num_experts_per_tok * moe_layers) == 0
    workers = {(name, labels["worker"]): value for name, labels, value in parsed(text) if "worker_" in name}
    assert workers[("moe_serve:worker_steps_total", "attention-0")] >= 1
    assert workers[("moe_serve:worker_busy_seconds_total", "attention-0")] > 0
    assert ("moe_serve:worker_step_time_seconds", "attention-0") in workers



def test_api_keys_body_limit_and_queue_limit():
    from fastapi.testclient import TestClient

    from router.openai_server import ServerLimits
    from tests.fake_runner import fake_engine

    engine = AsyncEngine(fake_engine())
    try:
        app = build_app(engine, "fake", ServerLimits(api_keys=("k1",), max_body_bytes=2000))
        with TestClient(app) as http:
            body = {"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0}
            refused = http.post("/v1/completions", json=body)
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
            assert http.post("/v1/completions", json=body, headers={"Authorization": "Bearer k2"}).status_code == 401
            ok = http.post("/v1/completions", json=body, headers={"Authorization": "Bearer k1"})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
            assert http.get("/health").status_code == 200  # open without a key
            big = {**body, "prompt": list(range(1, 900))}
            r = http.post("/v1/completions", json=big, headers={"Authorization": "Bearer k1"})
            assert r.status_code == 413 and "over 2000 bytes" in r.json()["error"]["message"]
    finally:
        engine.shutdown()
    full = AsyncEngine(fake_engine(max_waiting=0))
    try:
        with TestClient(build_app(full, "fake")) as http:
            r = http.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1" and "busy" in r.json()["error"]["message"]
            r = http.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 2, "stream": True})
            assert r.status_code == 429
    finally:
        full.shutdown()


def test_closing_merged_streams_midway_closes_every_stream():
    """A client that leaves while n>1 samples stream: each sample's stream is closed (its request aborted), also
    those a pump task is still inside of (closing those directly raised "asynchronous generator is already
    running")."""
    import asyncio

    from router.openai_responses import merged_streams

    closed = []

    async def stream(i, first):
        try:
            if first:
                yield i
            await asyncio.Event().wait()  # then nothing more comes
            yield -1
        finally:
            closed.append(i)

    async def main():
        merged = merged_streams([stream(0, True), stream(1, False), stream(2, True)])
        got = [await merged.__anext__(), await merged.__anext__()]
        await merged.aclose()
        for _ in range(3):
            await asyncio.sleep(0)  # the cancelled pumps unwind, closing their streams
        return got

    assert sorted(asyncio.run(main())) == [(0, 0), (2, 2)]
    assert sorted(closed) == [0, 1, 2]


def test_api_key_check_reads_the_first_authorization_header_and_refuses_odd_bytes():
    from fastapi.testclient import TestClient

    from router.openai_server import ServerLimits
    from tests.fake_runner import fake_engine

    engine = AsyncEngine(fake_engine())
    try:
        app = build_app(engine, "fake", ServerLimits(api_keys=("k1",)))
        with TestClient(app) as http:
            body = {"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0}
            first_right = [("authorization", "Bearer k1"), ("authorization", "Bearer nope")]
            assert http.post("/v1/completions", json=body, headers=first_right).status_code == 200
            first_wrong = [("authorization", "Bearer nope"), ("authorization", "Bearer k1")]
            assert http.post("/v1/completions", json=body, headers=first_wrong).status_code == 401
            odd = {"authorization": "Bearer k\u00e9y".encode()}  # UTF-8 bytes on the wire: 401, not a 500
            assert http.post("/v1/completions", json=body, headers=odd).status_code == 401
    finally:
        engine.shutdown()
