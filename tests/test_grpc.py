"""The gRPC front door, driven by a client generated from proto/: streaming, sessions, errors as status codes,
deadlines and cancellation reaching the engine, Abort, health and reflection."""

import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from proto import moe_serve_pb2 as pb
from proto import moe_serve_pb2_grpc as pb_grpc
from router.async_engine import AsyncEngine
from router.engine_config import EngineConfig
from router.frontend import Frontend
from router.grpc_servicer import GrpcServicer
from router.llm_engine import LLMEngine
from router.session_store import SessionStore
from tests.harness import grpc_served, hf_greedy, hf_model

KEY = [("authorization", "Bearer k1")]
GREEDY = pb.SamplingParams(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def server(checkpoint_dir):
    d = checkpoint_dir("v2_lite")
    core = LLMEngine.from_config(EngineConfig(model=str(d), dtype="float32", kv_cache_gib=0.05, max_model_len=512))
    engine = AsyncEngine(core)
    with grpc_served(GrpcServicer(Frontend(engine, "tiny", SessionStore()), api_keys=("k1",))) as channel:
        yield {"stub": pb_grpc.MoeServeStub(channel), "channel": channel, "core": core, "dir": d}
    engine.shutdown()


def wait_idle(core):
    for _ in range(200):
        if not core.has_unfinished():
            return True
        time.sleep(0.05)
    return False


def test_generate_streams_tokens_equal_to_transformers(server):
    stub, core = server["stub"], server["core"]
    ids = core.tokenizer.encode("def add(a, b):")
    params = pb.SamplingParams(temperature=0, ignore_eos=True, max_tokens=10, logprobs=2)
    messages = list(stub.Generate(pb.GenerateRequest(text="def add(a, b):", params=params), metadata=KEY))
    # One token per step, streamed; outputs that pile up behind a busy reader are merged into one message.
    assert 1 <= len(messages) <= 10 and all(m.token_ids for m in messages)
    tokens = [t for m in messages for t in m.token_ids]
    assert tokens == hf_greedy(hf_model(server["dir"]), ids, 10)
    assert "".join(m.text for m in messages) == core.tokenizer.decode(tokens, skip_special_tokens=True)
    last = messages[-1]
    assert last.finish_reason == "length" and all(not m.finish_reason for m in messages[:-1])
    assert last.usage.prompt_tokens == len(ids) and last.usage.completion_tokens == 10
    assert all(len(m.logprobs) == len(m.token_ids) for m in messages)
    assert all(len(lp.top_token_ids) == 2 for m in messages for lp in m.logprobs)
    by_ids = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), params=params), metadata=KEY))
    assert [t for m in by_ids for t in m.token_ids] == tokens


def test_chat_session_reuses_its_history(server):
    stub = server["stub"]
    session = stub.CreateSession(pb.CreateSessionRequest(), metadata=KEY)
    messages = [pb.ChatMessage(role="user", content="write a quicksort")]
    params = pb.SamplingParams(temperature=0, ignore_eos=True, max_tokens=6)
    one = list(stub.Chat(pb.ChatRequest(messages=messages, params=params, session_id=session.session_id),
                         metadata=KEY))
    reply = "".join(m.text for m in one)
    messages += [pb.ChatMessage(role="assistant", content=reply), pb.ChatMessage(role="user", content="in C")]
    two = list(stub.Chat(pb.ChatRequest(messages=messages, params=params, session_id=session.session_id),
                         metadata=KEY))
    first, second = one[-1].usage, two[-1].usage
    assert second.cached_tokens >= first.prompt_tokens + first.completion_tokens - 16
    assert stub.DeleteSession(pb.DeleteSessionRequest(session_id=session.session_id), metadata=KEY).deleted
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Chat(pb.ChatRequest(messages=messages, params=params, session_id=session.session_id),
                       metadata=KEY))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "no session" in e.value.details()


@pytest.mark.parametrize("request_, metadata, code, says", [
    (pb.GenerateRequest(text="hi", params=pb.SamplingParams(temperature=-1)), KEY, "INVALID_ARGUMENT",
     "temperature"),
    (pb.GenerateRequest(params=GREEDY), KEY, "INVALID_ARGUMENT", "give a prompt"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 99999]), params=GREEDY), KEY, "INVALID_ARGUMENT",
     "token ids must be in"),
    (pb.GenerateRequest(text="x" * 600, params=GREEDY), KEY, "INVALID_ARGUMENT", "context"),
    (pb.GenerateRequest(text="hi", model="gpt-4"), KEY, "NOT_FOUND", "does not exist"),
    (pb.GenerateRequest(text="hi", session_id="sess-nope"), KEY, "NOT_FOUND", "no session"),
    (pb.GenerateRequest(text="hi"), [], "UNAUTHENTICATED", "API key"),
    (pb.GenerateRequest(text="hi"), [("authorization", "Bearer k2")], "UNAUTHENTICATED", "API key"),
])
def test_bad_requests_get_a_status_that_says_what_to_fix(server, request_, metadata, code, says):
    with pytest.raises(grpc.RpcError) as e:
        list(server["stub"].Generate(request_, metadata=metadata))
    assert e.value.code() == getattr(grpc.StatusCode, code) and says in e.value.details()


def test_deadline_dropped_stream_and_abort_reach_the_engine(server):
    stub, core = server["stub"], server["core"]
    long = pb.GenerateRequest(text="x", params=pb.SamplingParams(temperature=0, ignore_eos=True, max_tokens=400))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(long, metadata=KEY, timeout=0.5))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_idle(core)
    call = stub.Generate(long, metadata=KEY)
    next(call)
    call.cancel()  # the client drops the stream
    assert wait_idle(core)
    named = pb.GenerateRequest(request_id="job-1", text="x", params=long.params)
    call = stub.Generate(named, metadata=KEY)
    next(call)
    assert stub.Abort(pb.AbortRequest(request_id="job-1"), metadata=KEY).found
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    assert wait_idle(core)
    assert not stub.Abort(pb.AbortRequest(request_id="job-1"), metadata=KEY).found


def test_tokenize_health_and_reflection(server):
    stub, channel = server["stub"], server["channel"]
    tok = stub.Tokenize(pb.TokenizeRequest(text="abc", add_special_tokens=True), metadata=KEY)
    assert list(tok.token_ids) == server["core"].tokenizer.encode("abc") and tok.max_model_len == 512
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "moe_serve.v1.MoeServe"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == \
            health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    (listed,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {s.name for s in listed.list_services_response.service}
    assert {"moe_serve.v1.MoeServe", "grpc.health.v1.Health"} <= names
    (found,) = refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="moe_serve.v1.MoeServe")]))
    assert found.file_descriptor_response.file_descriptor_proto


def test_the_generated_code_matches_the_proto(tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--python_out={tmp_path}",
                    f"--grpc_python_out={tmp_path}", "proto/moe_serve.proto"], check=True)
    for name in ("moe_serve_pb2.py", "moe_serve_pb2_grpc.py"):
        assert (tmp_path / "proto" / name).read_text() == open(f"proto/{name}").read(), \
            f"proto/{name} is stale: regenerate it (see proto/__init__.py)"
