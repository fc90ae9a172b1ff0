"""Sessions: history pinned in the engine's cache between turns, and the HTTP session API over the real model."""

import time

import httpx
import openai
import pytest

from router.async_engine import AsyncEngine
from router.engine_config import EngineConfig
from router.llm_engine import LLMEngine
from router.openai_server import ServerLimits, build_app
from router.session_store import SessionError, SessionStore
from tests.fake_runner import fake_engine
from tests.harness import served
from workers.sampling_params import SamplingParams

P = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


def run(eng, prompt, session_id=None, params=P):
    rid = eng.add_request(prompt, params, session_id=session_id)
    final = None
    while eng.has_unfinished():
        for out in eng.step():
            if out.request_id == rid:
                final = out if final is None else final.merge(out)
    return final


def test_a_session_history_survives_a_flood_that_evicts_unpinned_blocks():
    eng = fake_engine(num_blocks=16, block_size=4)
    blocks = eng.scheduler.blocks
    a = run(eng, list(range(1, 11)), "s")  # 10 + 3 tokens: 3 full blocks computed, pinned
    b = run(eng, list(range(101, 111)))  # the same shape, no session: cached, not pinned
    assert blocks.num_free == 13
    run(eng, list(range(200, 250)), params=SamplingParams(max_tokens=1, ignore_eos=True))  # 13 blocks: all free ones
    turn2 = run(eng, a.prompt_token_ids + a.outputs[0].token_ids + [7, 8], "s")
    again = run(eng, b.prompt_token_ids + b.outputs[0].token_ids + [7, 8])
    assert turn2.num_cached_tokens == 12 and again.num_cached_tokens == 0
    eng.end_session("s")
    assert blocks.num_free == 16


def test_session_pins_expire_and_are_capped():
    eng = fake_engine(num_blocks=16, block_size=4, session_ttl_s=0.0)
    run(eng, list(range(1, 11)), "s")
    assert eng.sessions.pinned_blocks(0) == 3
    run(eng, [5, 6, 7])  # a step later, past the TTL
    assert eng.sessions.pinned_blocks(0) == 0 and eng.scheduler.blocks.num_free == 16
    capped = fake_engine(num_blocks=16, block_size=4, session_cache_fraction=0.25)  # at most 4 blocks pinned
    run(capped, list(range(1, 11)), "old")
    run(capped, list(range(20, 30)), "new")
    assert capped.sessions.rank_of("old") is None and capped.sessions.pinned_blocks(0) == 3  # LRU let go


def test_a_session_stays_on_its_attention_rank():
    eng = fake_engine(num_blocks=64, block_size=4, num_ranks=2)
    first = run(eng, list(range(1, 11)), "s")
    rank = eng.sessions.rank_of("s")
    eng.add_request(list(range(300, 340)), SamplingParams(max_tokens=50, ignore_eos=True))  # loads a rank
    eng.step()
    busy = next(r for r, s in enumerate(eng.schedulers) if s.running)
    eng.add_request(first.prompt_token_ids + first.outputs[0].token_ids + [9], P, "turn2", session_id="s")
    seq = eng.requests["turn2"][0]
    assert seq.rank == rank
    assert eng.add_request(list(range(500, 540)), P, "free") and eng.requests["free"][0].rank != busy


def test_session_store_binds_keys_and_expires():
    now = [0.0]
    store = SessionStore(ttl_s=10, max_sessions=2, clock=lambda: now[0])
    s = store.create("key-a")
    assert s.session_id.startswith("sess-") and len(s.session_id) > 30
    with pytest.raises(SessionError) as e:
        store.get(s.session_id, "key-b")
    assert not e.value.expired  # another key's session does not exist for you
    assert store.get(s.session_id, "key-a") is s
    now[0] = 11
    with pytest.raises(SessionError) as e:
        store.get(s.session_id, "key-a")
    assert e.value.expired and "expired" in str(e.value)
    a, b, c = store.create(None), store.create(None), store.create(None)  # over max_sessions: LRU goes
    with pytest.raises(SessionError, match="expired"):
        store.get(a.session_id, None)
    assert store.get(c.session_id, None) is c and store.get(b.session_id, None) is b


# --- over HTTP, with the real model ---

MODEL = "tiny"


@pytest.fixture(scope="module")
def server(checkpoint_dir):
    d = checkpoint_dir("v2_lite")
    core = LLMEngine.from_config(EngineConfig(model=str(d), dtype="float32", kv_cache_gib=0.05, max_model_len=512))
    engine = AsyncEngine(core)
    app = build_app(engine, MODEL, ServerLimits(api_keys=("k1", "k2")), SessionStore(ttl_s=60))
    with served(app) as url:
        yield {"url": url, "client": openai.OpenAI(base_url=f"{url}/v1", api_key="k1"), "engine": engine}
    engine.shutdown()


def new_session(server, key="k1", **body) -> str:
    r = httpx.post(server["url"] + "/v1/sessions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def chat(server, messages, session=None, stream=False, **kw):
    headers = {"X-Session-ID": session} if session else None
    return server["client"].chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=stream, extra_headers=headers,
        extra_body={"ignore_eos": True, "return_token_ids": not stream}, **kw)


def test_turn_two_prefills_only_its_new_tokens_and_equals_the_conversation_sent_whole(server):
    sid = new_session(server)
    tokenizer = server["engine"].tokenizer
    eos = tokenizer.eos_token_id
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "sort a list"}]
    one = chat(server, messages, sid)
    prompt1, reply1 = one.model_extra["prompt_token_ids"], one.choices[0].model_extra["token_ids"]
    assert one.usage.prompt_tokens_details.cached_tokens == 0
    messages += [{"role": "assistant", "content": one.choices[0].message.content},
                 {"role": "user", "content": "now reverse it"}]
    two = chat(server, messages, sid)
    prompt2 = two.model_extra["prompt_token_ids"]
    history = prompt1 + reply1 + [eos]  # exactly what the model saw, then the EOS that closes its turn
    assert prompt2[:len(history)] == history
    new = len(prompt2) - len(history)
    block = server["engine"].engine.executor.block_size
    computed = two.usage.prompt_tokens - two.usage.prompt_tokens_details.cached_tokens
    assert new < computed <= new + block + 1  # the history's last partial block and unsampled last token only
    whole = server["client"].completions.create(model=MODEL, prompt=prompt2, max_tokens=12, temperature=0,
                                                extra_body={"ignore_eos": True})
    assert whole.choices[0].text == two.choices[0].message.content
    # a streamed third turn extends the same history
    messages += [{"role": "assistant", "content": two.choices[0].message.content},
                 {"role": "user", "content": "thanks"}]
    chunks = list(chat(server, messages, sid, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= len(prompt2) - block
    info = httpx.get(f"{server['url']}/v1/sessions/{sid}", headers={"Authorization": "Bearer k1"}).json()
    assert info["num_tokens"] == chunks[-1].usage.prompt_tokens + 12 + 1


def test_completion_sessions_continue_text(server):
    sid = new_session(server)
    client = server["client"]
    kw = dict(model=MODEL, max_tokens=8, temperature=0, extra_headers={"X-Session-ID": sid},
              extra_body={"ignore_eos": True, "return_token_ids": True})
    one = client.completions.create(prompt="def fib(n):", **kw)
    two = client.completions.create(prompt="def fib(n):" + one.choices[0].text + "\n\ndef", **kw)
    history = one.choices[0].model_extra["prompt_token_ids"] + one.choices[0].model_extra["token_ids"]
    assert two.choices[0].model_extra["prompt_token_ids"][:len(history)] == history
    assert two.usage.prompt_tokens_details.cached_tokens >= len(history) - 16


def test_session_errors_say_what_to_do(server):
    url, k1, k2 = server["url"], {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    sid = new_session(server)
    r = httpx.post(url + "/v1/chat/completions", json=body, headers={**k2, "X-Session-ID": sid})
    assert r.status_code == 404 and "no session" in r.json()["error"]["message"]  # bound to k1
    r = httpx.post(url + "/v1/chat/completions", json={**body, "n": 2}, headers={**k1, "X-Session-ID": sid})
    assert r.status_code == 400 and "n = 1" in r.json()["error"]["message"]
    long = {"messages": [{"role": "user", "content": "x" * 600}], "max_tokens": 2}
    r = httpx.post(url + "/v1/chat/completions", json=long, headers={**k1, "X-Session-ID": sid})
    assert r.status_code == 400 and "start a new session" in r.json()["error"]["message"]
    assert httpx.delete(f"{url}/v1/sessions/{sid}", headers=k1).json()["deleted"]
    r = httpx.post(url + "/v1/chat/completions", json=body, headers={**k1, "X-Session-ID": sid})
    assert r.status_code == 404
    short = new_session(server, ttl_s=0.2)
    time.sleep(0.5)
    r = httpx.post(url + "/v1/chat/completions", json=body, headers={**k1, "X-Session-ID": short})
    assert r.status_code == 410 and "expired" in r.json()["error"]["message"]
    assert httpx.post(url + "/v1/sessions", json={"ttl_s": -1}, headers=k1).status_code == 400


def test_a_request_needing_the_whole_cache_takes_back_the_blocks_sessions_hold():
    """A session's pinned history must not starve a request as long as the whole cache (found by the gRPC fuzzer:
    it waited forever); the rank takes the pins back, least recently used first, and the request completes."""
    core = fake_engine(num_blocks=16, block_size=4)  # a 64-token cache, and so a 64-token context
    core.add_request(list(range(1, 20)), SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), "turn",
                     session_id="s")
    while core.has_unfinished():
        core.step()
    assert core.sessions.pinned_blocks(0) > 0
    core.add_request([1, 2], SamplingParams(max_tokens=core.max_model_len - 2, temperature=0, ignore_eos=True))
    for _ in range(500):
        if not core.has_unfinished():
            break
        core.step()
    assert not core.has_unfinished()
    assert core.sessions.rank_of("s") is None  # its pin was given up; the session recomputes next turn
