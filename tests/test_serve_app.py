"""The Ray Serve application on a local Ray: HTTP through Serve's proxy, gRPC through Serve's gRPC proxy (with
grpc.health.v1, reflection and Serve's own Healthz), and LeastWorkRouter over two engine replicas: new requests go
to the less-loaded replica, and a session stays on the replica that holds its history."""

import threading

import grpc
import httpx
import pytest

ray = pytest.importorskip("ray")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc  # noqa: E402
from ray import serve  # noqa: E402

from cluster.serve_app import ServeOptions, build_serve_app, grpc_options  # noqa: E402
from proto import moe_serve_pb2 as pb  # noqa: E402
from proto import moe_serve_pb2_grpc as pb_grpc  # noqa: E402
from router.engine_config import EngineConfig  # noqa: E402
from router.llm_engine import LLMEngine  # noqa: E402
from tests.harness import parsed  # noqa: E402
from workers.multiproc_executor import free_port  # noqa: E402
from workers.sampling_params import SamplingParams  # noqa: E402

APP = [("application", "moe-serve")]


@pytest.fixture(scope="module")
def app(checkpoint_dir):
    d = checkpoint_dir("v2_lite")
    config = EngineConfig(model=str(d), dtype="float32", kv_cache_gib=0.05, max_model_len=512, worker_threads=1)
    http_port, grpc_port = free_port(), free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": http_port}, grpc_options=grpc_options(grpc_port))
    serve.run(build_serve_app(ServeOptions(config, model_name="tiny", engine_replicas=2, engine_cpus=1,
                                           routing_stats_period_s=0.5)), name="moe-serve", route_prefix="/")
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    yield {"url": f"http://127.0.0.1:{http_port}", "channel": channel, "config": config}
    channel.close()
    serve.shutdown()
    ray.shutdown()


def test_http_and_grpc_through_serve_equal_the_single_process_engine(app):
    url = app["url"]
    ids = httpx.post(url + "/tokenize", json={"prompt": "def add(a, b):"}).json()["tokens"]
    local = LLMEngine.from_config(app["config"])
    want = local.generate([ids], [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)])[0]
    local.shutdown()
    r = httpx.post(url + "/v1/completions", timeout=60, json={"prompt": "def add(a, b):", "max_tokens": 8,
                                                              "temperature": 0, "ignore_eos": True,
                                                              "return_token_ids": True})
    assert r.status_code == 200 and r.headers["x-moe-serve-replica"]
    assert r.json()["choices"][0]["token_ids"] == want.outputs[0].token_ids
    bad = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": -1})
    assert bad.status_code == 400 and "max_tokens" in bad.json()["error"]["message"]
    stub = pb_grpc.MoeServeStub(app["channel"])
    params = pb.SamplingParams(temperature=0, ignore_eos=True, max_tokens=8)
    messages = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), params=params), metadata=APP))
    assert [t for m in messages for t in m.token_ids] == want.outputs[0].token_ids
    # Outputs that pile up behind a busy reader are merged, so the count of messages may be under 8; only the last
    # says why the stream ended and carries the usage.
    assert [m.finish_reason for m in messages] == [""] * (len(messages) - 1) + ["length"]
    assert messages[-1].usage.completion_tokens == 8 and not any(m.HasField("usage") for m in messages[:-1])
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(text="hi", params=pb.SamplingParams(temperature=-1)), metadata=APP))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in e.value.details()


def test_grpc_health_reflection_and_serve_healthz(app):
    channel = app["channel"]
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service="moe_serve.v1.MoeServe"), metadata=APP).status == \
        health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (listed,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    assert "moe_serve.v1.MoeServe" in {s.name for s in listed.list_services_response.service}
    healthz = channel.unary_unary("/ray.serve.RayServeAPIService/Healthz", request_serializer=lambda _: b"",
                                  response_deserializer=lambda b: b)
    assert b"success" in healthz(None)


def test_new_requests_go_to_the_less_loaded_replica_and_sessions_stay(app):
    url = app["url"]
    long = {"prompt": "x" * 300, "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    busy: dict = {}
    started = threading.Event()

    def run_long():
        with httpx.stream("POST", url + "/v1/completions", json=long, timeout=120) as r:
            busy["replica"] = r.headers["x-moe-serve-replica"]
            started.set()
            for _ in r.iter_lines():
                pass

    thread = threading.Thread(target=run_long)
    thread.start()
    assert started.wait(60)
    short = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
    served = [httpx.post(url + "/v1/completions", json=short, timeout=60).headers["x-moe-serve-replica"]
              for _ in range(4)]
    assert all(r != busy["replica"] for r in served), (busy, served)
    sid = httpx.post(url + "/v1/sessions", json={}).json()["id"]
    messages = [{"role": "user", "content": "hello"}]
    homes, cached, loads = [], [], []
    for turn in range(3):
        r = httpx.post(url + "/v1/chat/completions", headers={"X-Session-ID": sid}, timeout=60,
                       json={"messages": messages, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        homes.append(r.headers["x-moe-serve-replica"])
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
        messages += [{"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]},
                     {"role": "user", "content": f"and {turn}?"}]
        # the other replica now gets a long request, so that it is the less loaded one no longer matters
        loads.append(threading.Thread(target=httpx.post, args=(url + "/v1/completions",),
                                      kwargs={"json": {**long, "stream": False, "max_tokens": 60}, "timeout": 120}))
        loads[-1].start()
    assert len(set(homes)) == 1 and cached[1] > 0 and cached[2] > cached[1]
    for t in [thread, *loads]:  # done before the app is shut down under them
        t.join(120)
    replicas = set(served) | {busy["replica"]}
    series = parsed(httpx.get(url + "/metrics").text)
    steps = {labels["replica"] for name, labels, value in series
             if name == "moe_serve:worker_steps_total" and labels["worker"] == "attention-0" and value > 0}
    assert steps == replicas  # each replica's workers, under its id
    assert {labels["replica"] for name, labels, value in series if name == "moe_serve:expert_tokens_total"} == replicas


def test_status_board_shows_each_engine_replica_and_drops_stale_posts(app, monkeypatch):
    import time
    from types import SimpleNamespace

    from cluster import status_board

    deadline = time.monotonic() + 30
    while len(board := status_board.read_board()) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)  # each replica posts with its routing stats, every 0.5 s here
    assert len(board) == 2, board
    node = ray.get_runtime_context().get_node_id()
    for posted_node, stats in board.values():
        assert posted_node == node and stats.num_blocks > 0
    some_stats = next(iter(board.values()))[1]
    with monkeypatch.context() as m:  # a post from long ago: a replica gone since
        m.setattr(status_board, "time", SimpleNamespace(time=lambda: 0.0))
        status_board.publish("gone", some_stats)
    status_board.publish("extra", some_stats)

    def keys():
        return {k.decode() for k in status_board._internal_kv_list(status_board.PREFIX, namespace="moe-serve")}

    assert status_board.PREFIX + "gone" in keys()
    now = status_board.read_board()
    assert set(now) == set(board) | {"extra"}  # the old post is not shown,
    assert now["extra"] == (node, some_stats)  # a post reads back as it was posted
    assert status_board.PREFIX + "gone" not in keys()  # and the reader deleted it
    status_board.remove_board()  # clearing the board removes every post (the replicas post theirs again)
    assert status_board.PREFIX + "extra" not in keys()
