"""Bad input over gRPC: hypothesis draws requests for every RPC of moe_serve.v1.MoeServe from the proto's own
descriptors (tests/proto_strategies.py), and request bodies below the message level (random bytes, cut or changed
encodings, wrong wire types, bad UTF-8), and sends them to a real grpc.aio server (serve_grpc) over the fake engine
with the real tokenizer and chat template, so every request runs to its end fast: one call at a time, and several
at once (shared request ids and sessions, Abort racing its stream).

What is asserted, for every call:
- it ends within TIMEOUT (a hang reads as DEADLINE_EXCEEDED, which fails);
- it ends OK or with a client-error code and a message; never INTERNAL or UNKNOWN (a server bug), nor anything else;
  the message is the server's (not the client's "received metadata size exceeds ...", which hides it);
- a stream that ends OK ends with a message that has finish_reason, and only the last one has it;
- a body that does not parse as the method's request gets INVALID_ARGUMENT naming the message type (grpc itself
  would answer UNKNOWN "Unexpected <class 'DecodeError'>": serve_grpc parses requests itself to say so).
After the fuzzing the service still serves: a valid Generate runs, no request is left in the engine or the
servicer, and no session is left busy.
"""

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import grpc
import pytest
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proto import moe_serve_pb2 as pb
from router.async_engine import AsyncEngine
from router.engine_config import EngineConfig
from router.frontend import Frontend
from router.grpc_server import SERVICE
from router.grpc_servicer import GrpcServicer
from router.llm_engine import LLMEngine, load_tokenizer
from router.session_store import SessionStore
from tests.fake_runner import VOCAB, FakeExecutor
from tests.harness import grpc_served
from tests.proto_strategies import messages, near, texts, wire_bytes

KEY = [("authorization", "Bearer k1")]
TIMEOUT = 20  # seconds a call may take; far more than any takes here
METHODS = {m.name: m for m in pb.DESCRIPTOR.services_by_name["MoeServe"].methods}
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED,
                 grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.FAILED_PRECONDITION,
                 grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.ABORTED}
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
# the right key 9 times in 10; else none, another header, or a wrong or malformed one
BAD_METADATA = st.lists(st.tuples(
    st.sampled_from(["authorization", "x-api-key"]),
    st.sampled_from(["Bearer ", "bearer ", ""]).flatmap(lambda p: st.text(
        st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12).map(lambda s: p + s))), max_size=2)
METADATA = st.sampled_from([st.just(KEY)] * 9 + [BAD_METADATA]).flatmap(lambda s: s)
SHORT = pb.SamplingParams(temperature=0, max_tokens=4)


def valid_requests(sessions: tuple[str, ...]) -> dict:
    """A request each method takes, for near() to change a field or two of."""
    return {"Generate": pb.GenerateRequest(request_id="job-1", text="def add(a, b):", params=SHORT),
            "Chat": pb.ChatRequest(request_id="job-2", messages=[pb.ChatMessage(role="user", content="hi")],
                                   params=SHORT, session_id=sessions[0]),
            "Abort": pb.AbortRequest(request_id="job-1"),
            "Tokenize": pb.TokenizeRequest(text="abc", add_special_tokens=True),
            "CreateSession": pb.CreateSessionRequest(ttl_s=60),
            "DeleteSession": pb.DeleteSessionRequest(session_id=sessions[1])}


@contextmanager
def serving(checkpoint_dir, **config):
    """A grpc.aio server (serve_grpc, as `moe-serve` runs it) over the fake engine with the real tokenizer, on its
    own event loop thread; a 64-block cache of 4-token blocks."""
    tokenizer = load_tokenizer(checkpoint_dir("v2_lite"))
    model_config = SimpleNamespace(vocab_size=VOCAB, max_position_embeddings=4096, eos_token_ids=())
    core = LLMEngine(EngineConfig(block_size=4, **config), model_config, FakeExecutor(64, 4), tokenizer)
    engine = AsyncEngine(core)
    servicer = GrpcServicer(Frontend(engine, "fake", SessionStore()), api_keys=("k1",))
    try:
        with grpc_served(servicer) as channel:
            yield SimpleNamespace(channel=channel, core=core, servicer=servicer)
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def server(checkpoint_dir):
    # a 128-token context: a request that takes all of it still fits beside the sessions' pins (at most half the
    # cache); a 256-token one does not (test_a_request_as_long_as_the_context_ends_beside_pinned_sessions)
    with serving(checkpoint_dir, max_model_len=128) as s:
        # strings that mean something here, for the fuzzer to draw: live sessions, the model, the roles, request ids
        sessions = tuple(call(s, METHODS["CreateSession"], pb.CreateSessionRequest()).session_id for _ in range(3))
        s.known = sessions + ("fake", "user", "assistant", "system", "job-1", "job-2")
        s.valid = valid_requests(sessions)
        yield s


def call(server, method, request, metadata=KEY, cancelled=False):
    """Calls the method with a request message, or with raw bytes as the body; returns its response (a list of
    them for a stream) or its RpcError, after checking it as the module says. cancelled: CANCELLED is right too
    (an Abort named the request)."""
    raw = isinstance(request, bytes)
    serialize = None if raw else GetMessageClass(method.input_type).SerializeToString  # None: the bytes as they are
    parse = GetMessageClass(method.output_type).FromString
    path = f"/{SERVICE}/{method.name}"
    said = f"{method.name}({str(request)[:2000]!r}, metadata={metadata})"
    try:
        if method.server_streaming:
            rpc = server.channel.unary_stream(path, request_serializer=serialize, response_deserializer=parse)
            out = list(rpc(request, metadata=metadata, timeout=TIMEOUT))
            assert out and out[-1].finish_reason, f"{said}: the stream ended without a finish_reason"
            assert not any(m.finish_reason for m in out[:-1]), said
            return out
        rpc = server.channel.unary_unary(path, request_serializer=serialize, response_deserializer=parse)
        return rpc(request, metadata=metadata, timeout=TIMEOUT)
    except grpc.RpcError as e:
        assert e.code() in CLIENT_ERRORS or cancelled and e.code() == grpc.StatusCode.CANCELLED, \
            f"{said} -> {e.code()}: {e.details()}"
        assert e.details(), f"{said} -> {e.code()} with no message"
        assert "metadata size exceeds" not in e.details(), f"{said}: the server's message was lost: {e.details()}"
        return e


@pytest.mark.parametrize("name", list(METHODS))
def test_no_generated_request_gets_a_server_error(server, name):
    method = METHODS[name]

    text = texts(server.known)

    @given(request=st.one_of(messages(method.input_type, text), near(server.valid[name], text)), metadata=METADATA)
    @FUZZ
    def check(request, metadata):
        call(server, method, request, metadata)

    check()


def test_concurrent_calls_get_no_server_error(server):
    """Calls at once: the same request ids (a duplicate is refused), a session's turn while another runs (refused:
    it is busy), Abort while its request streams (that stream ends CANCELLED)."""
    text = texts(server.known)
    one = st.sampled_from(list(METHODS)).flatmap(lambda name: st.tuples(st.just(name), st.one_of(
        near(server.valid[name], text), messages(METHODS[name].input_type, text))))

    @given(calls=st.lists(one, min_size=2, max_size=6))
    @FUZZ
    def check(calls):
        aborted = {r.request_id for name, r in calls if name == "Abort"}
        with ThreadPoolExecutor(len(calls)) as pool:
            for f in [pool.submit(call, server, METHODS[name], r, KEY, getattr(r, "request_id", None) in aborted)
                      for name, r in calls]:
                f.result()

    check()


@pytest.mark.parametrize("name", list(METHODS))
def test_a_body_that_does_not_parse_gets_invalid_argument(server, name):
    method = METHODS[name]
    request_cls = GetMessageClass(method.input_type)

    @given(body=wire_bytes(method.input_type))
    @example(body=b"\xff\xff\xff")
    @example(body=b"\x0a\x02\xff\xfe")  # field 1, a string in every request here, of bad UTF-8
    @example(body=b"\x0a\x05ab")  # its length past the end
    @FUZZ
    def check(body):
        try:
            request_cls.FromString(body)
        except DecodeError:
            e = call(server, method, body)
            assert isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
            assert method.input_type.full_name in e.details(), e.details()
        else:  # it parses (unknown fields are skipped, wide varints cut): as any request
            call(server, method, body)

    check()


@pytest.mark.parametrize("name, request_, code, says", [
    ("Generate", pb.GenerateRequest(text="hi", model="é" * 5000), "NOT_FOUND", "the model 'éé"),
    ("Generate", pb.GenerateRequest(text="hi", session_id="s" * 100_000), "NOT_FOUND", "no session sss"),
    ("DeleteSession", pb.DeleteSessionRequest(session_id="\U0010ffff" * 50_000), "NOT_FOUND", "no session"),
])
def test_an_error_that_echoes_a_huge_value_still_reaches_the_client(server, name, request_, code, says):
    """The echoed value is cut: whole, it made trailers past the client's limit, and the client saw only
    RESOURCE_EXHAUSTED 'received metadata size exceeds hard limit', not what to fix."""
    e = call(server, METHODS[name], request_)
    assert isinstance(e, grpc.RpcError) and e.code() == getattr(grpc.StatusCode, code), e
    assert e.details().startswith(says) and len(e.details()) < 4096, e.details()[:200]


def test_abort_ends_its_stream_whatever_the_call_is_doing(server):
    """Abort cancelled the call's task, and one that landed while grpc was sending a message (not waiting on the
    engine) was swallowed by grpc: the call then never ended, and its client waited forever. With the fast fake
    engine that was the common case."""
    generate, abort = METHODS["Generate"], METHODS["Abort"]
    params = pb.SamplingParams(temperature=0, ignore_eos=True, max_tokens=120)
    rpc = server.channel.unary_stream(f"/{SERVICE}/Generate", pb.GenerateRequest.SerializeToString,
                                      pb.GenerateResponse.FromString)
    executor = server.core.executor
    # a step of 0.5 ms: else the fake engine often ends all 120 tokens before the Abort lands (the stream's
    # outputs then come merged, in a message or two, while grpc is still sending the first)
    executor.execute = lambda plans, execute=executor.execute: time.sleep(0.0005) or execute(plans)
    found = []
    for i in range(20):
        stream = rpc(pb.GenerateRequest(request_id=f"abort-{i}", text="x", params=params), metadata=KEY,
                     timeout=TIMEOUT)
        first = next(stream)
        found.append(call(server, abort, pb.AbortRequest(request_id=f"abort-{i}")).found)
        if found[-1]:
            with pytest.raises(grpc.RpcError) as e:
                list(stream)
            assert e.value.code() == grpc.StatusCode.CANCELLED and "Abort" in e.value.details(), (i, e.value)
        else:  # it had ended before the Abort came (outputs that piled up come merged: maybe all in the first)
            assert ([first] + list(stream))[-1].finish_reason == "length"
    del executor.execute  # the class's again
    assert sum(found) >= 5, found
    assert not server.servicer.running and isinstance(call(server, generate, server.valid["Generate"]), list)


def test_the_service_still_serves_after_the_fuzzing(server):
    params = pb.SamplingParams(temperature=0, ignore_eos=True, max_tokens=5)
    out = call(server, METHODS["Generate"], pb.GenerateRequest(text="def add(a, b):", params=params))
    assert isinstance(out, list) and sum(len(m.token_ids) for m in out) == 5 and out[-1].finish_reason == "length"
    for _ in range(200):  # every call above has ended; its engine request must too
        if not server.core.has_unfinished():
            break
        time.sleep(0.05)
    assert not server.core.has_unfinished()
    assert not server.servicer.running
    assert not any(s.busy for s in server.servicer.front.sessions.sessions.values())


def test_a_request_as_long_as_the_context_ends_beside_pinned_sessions(checkpoint_dir):
    """Found by the fuzzer (an empty SamplingParams: max_tokens is then all the room the context leaves)."""
    with serving(checkpoint_dir) as s:  # a 256-token context: the whole cache
        session = call(s, METHODS["CreateSession"], pb.CreateSessionRequest())
        turn = pb.GenerateRequest(text="def add(a, b):" * 4, params=SHORT, session_id=session.session_id)
        assert isinstance(call(s, METHODS["Generate"], turn), list)
        for _ in range(100):  # the engine pins the session's history as its turn ends
            if s.core.sessions.pinned_blocks(0):
                break
            time.sleep(0.01)
        rpc = s.channel.unary_stream(f"/{SERVICE}/Generate", pb.GenerateRequest.SerializeToString,
                                     pb.GenerateResponse.FromString)
        out = list(rpc(pb.GenerateRequest(text="hi"), metadata=KEY, timeout=3))
        assert out[-1].finish_reason == "length"
