"""Recovery: an expert worker actor is killed in the middle of a streaming request. The replica rebuilds its workers
in place; the stream moves onto the rebuilt engine with the tokens it had and goes on unbroken, as if nothing had
died (so it waited for the rebuild); later requests give the single-process engine's tokens. If the engine cannot be rebuilt,
it stops and refuses requests with the cause (so the replica fails its health check, and Serve replaces it). The same
with the engine replica serving the doors itself (`--ingress engine`: the stream moves within the replica)."""

import asyncio
import time

import httpx
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from cluster.ray_executor import NAMESPACE  # noqa: E402
from cluster.serve_app import ServeOptions, build_serve_app  # noqa: E402
from router.async_engine import AsyncEngine, EngineError  # noqa: E402
from router.engine_config import EngineConfig  # noqa: E402
from router.llm_engine import LLMEngine  # noqa: E402
from tests.fake_runner import fake_engine  # noqa: E402
from tests.harness import sse_events  # noqa: E402
from workers.executor import WorkerError  # noqa: E402
from workers.multiproc_executor import free_port  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402

PROMPT = "def fibonacci(n):"
SHORT = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "return_token_ids": True}


@pytest.mark.parametrize("engine_ingress", [False, True], ids=["ingress", "engine-ingress"])
def test_a_killed_expert_moves_its_stream_and_the_instance_recovers(checkpoint_dir, engine_ingress):
    d = checkpoint_dir("v2_lite")
    local_config = EngineConfig(model=str(d), dtype="float32", kv_cache_gib=0.05, max_model_len=512)
    local = LLMEngine.from_config(local_config)
    prompt = [local.tokenizer.encode(PROMPT)]
    want = local.generate(prompt, [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)])[0].outputs[0]
    want = want.token_ids
    unbroken = local.generate(prompt, [SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)])[0].outputs[0]
    local.shutdown()

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1/completions"
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = EngineConfig(**{**local_config.__dict__, "attention_workers": 1, "expert_workers": 2,
                                 "worker_threads": 1})
        serve.run(build_serve_app(ServeOptions(config, model_name="tiny", engine_ingress=engine_ingress)),
                  name="moe-serve", route_prefix="/")

        base = f"http://127.0.0.1:{port}/v1"
        sid = httpx.post(base + "/sessions", json={}).json()["id"]
        chat = {"max_tokens": 6, "temperature": 0, "ignore_eos": True}
        messages = [{"role": "user", "content": "write a sort"}]
        first = httpx.post(base + "/chat/completions", headers={"X-Session-ID": sid}, timeout=60,
                           json={**chat, "messages": messages}).json()
        messages += [first["choices"][0]["message"], {"role": "user", "content": "now in C"}]

        long = {"prompt": PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url, json=long, timeout=60) as r:
            replica = r.headers["x-moe-serve-replica"]
            events = sse_events(r)
            chunks = [next(events)]  # tokens are coming
            victim = ray.get_actor(f"moe-serve/{replica}/expert-1", namespace=NAMESPACE)
            ray.kill(victim)
            killed = time.monotonic()
            chunks += list(events)
        recovery_s = time.monotonic() - killed  # the stream waited for the rebuild, then ran to its end
        assert not any("error" in c for c in chunks), chunks[-1]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        assert text == unbroken.text and chunks[-1]["choices"][0]["finish_reason"] == "length"
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'moe_serve:request_migrations_total{model_name="tiny"} 1.0' in metrics

        after = httpx.post(url, json=SHORT, timeout=120)
        assert after.status_code == 200, after.text
        assert after.headers["x-moe-serve-replica"] == replica  # rebuilt in place, not replaced
        assert after.json()["choices"][0]["token_ids"] == want
        print(f"recovery: expert killed -> the moved stream's end {recovery_s:.2f} s")

        again = httpx.post(url, json=SHORT, timeout=60)
        assert again.json()["choices"][0]["token_ids"] == want
        reborn = ray.get_actor(f"moe-serve/{replica}/expert-1", namespace=NAMESPACE)
        assert reborn._actor_id != victim._actor_id

        # the session made before the death goes on: its history, held by the router, is recomputed once
        turn = httpx.post(base + "/chat/completions", headers={"X-Session-ID": sid}, timeout=60,
                          json={**chat, "messages": messages})
        assert turn.status_code == 200, turn.text
        twin = httpx.post(base + "/sessions", json={}).json()["id"]  # the same two turns, nothing dying between
        for n in (1, 3):
            same = httpx.post(base + "/chat/completions", headers={"X-Session-ID": twin}, timeout=60,
                              json={**chat, "messages": messages[:n]}).json()
        assert turn.json()["choices"][0]["message"] == same["choices"][0]["message"]
        messages += [turn.json()["choices"][0]["message"], {"role": "user", "content": "thanks"}]
        third = httpx.post(base + "/chat/completions", headers={"X-Session-ID": sid}, timeout=60,
                           json={**chat, "messages": messages}).json()
        assert third["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # pinned again on the new workers
    finally:
        serve.shutdown()
        ray.shutdown()


def test_an_engine_that_cannot_be_rebuilt_stops_and_refuses_with_the_cause():
    def dead(plans):
        raise WorkerError("worker moe-serve/r/attention-0 died")

    def rebuild():
        raise WorkerError("the cluster found no room for 2 expert workers")

    core = fake_engine()
    core.executor.execute = dead
    eng = AsyncEngine(core, rebuild=rebuild)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)

    async def run():
        async for _ in eng.generate([1, 2, 3], params):
            pass

    with pytest.raises(EngineError, match="attention-0 died"):
        asyncio.run(run())
    with pytest.raises(EngineError, match="the engine stopped: the cluster found no room"):
        asyncio.run(run())
    assert not eng.alive  # EngineServer's health check fails
