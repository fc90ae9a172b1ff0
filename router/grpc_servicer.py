"""GrpcServicer: the gRPC front door (proto/moe_serve.proto) over the same Frontend as HTTP.

Each call takes the request message and the caller's metadata, and raises RequestError for a refusal; `serve_grpc`
(router/grpc_server.py) and the Ray Serve ingress turn those into gRPC status codes. A call cancelled by its
client (a dropped stream, a deadline) closes its engine streams, which aborts the generation; so does Abort.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import grpc

from proto import moe_serve_pb2 as pb
from router.api_key_auth import bearer, key_allowed
from router.frontend import Frontend
from router.request_error import RequestError
from router.request_output import RequestOutput
from router.session_store import Session
from workers.sampling_params import SamplingParams

STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                404: grpc.StatusCode.NOT_FOUND, 409: grpc.StatusCode.FAILED_PRECONDITION,
                410: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                429: grpc.StatusCode.RESOURCE_EXHAUSTED, 499: grpc.StatusCode.CANCELLED,
                503: grpc.StatusCode.UNAVAILABLE}
MAX_DETAILS = 2048  # bytes of a status message as it travels, percent-encoded; a client refuses trailers past 8 KiB
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "skip_special_tokens")


def status_code(e: RequestError) -> grpc.StatusCode:
    return STATUS_CODES.get(e.status, grpc.StatusCode.INTERNAL)


def details(message: str) -> str:
    """The message as a status's details, cut to fit in the trailers. Whole, an error that echoes a huge value
    from the request (a model name, a session id) reached the client as RESOURCE_EXHAUSTED 'received metadata
    size exceeds hard limit' in place of what to fix."""
    size = 0
    for i, ch in enumerate(message):
        size += 1 if " " <= ch <= "~" and ch != "%" else 3 * len(ch.encode("utf-8", "surrogatepass"))
        if size > MAX_DETAILS:
            return message[:i] + "…"
    return message


class GrpcServicer:
    def __init__(self, front: Frontend, api_keys: tuple[str, ...] = ()):
        self.front = front
        self.api_keys = api_keys
        self.running: dict[str, Running] = {}  # request id -> the call streaming it

    def authorize(self, metadata) -> str | None:
        """The caller's API key (from 'authorization: Bearer <key>'); a RequestError if keys are required and
        it is missing or wrong."""
        key = bearer(dict(metadata or ()).get("authorization", ""))
        if not self.api_keys:
            return None  # an open server: sessions belong to no one in particular
        if key is None or not key_allowed(key.encode(), self.api_keys):
            raise RequestError(401, "missing or wrong API key: send the metadata 'authorization: Bearer <key>'")
        return key

    async def Generate(self, request: pb.GenerateRequest, metadata) -> AsyncIterator[pb.GenerateResponse]:
        front = self.front
        key = self.authorize(metadata)
        front.check_model(request.model)
        session = front.session(request.session_id, key)
        which = request.WhichOneof("prompt")
        if which is None:
            raise RequestError(400, "give a prompt: 'text' or 'token_ids'", param="prompt")
        given = request.text if which == "text" else list(request.token_ids.ids)
        if session is not None:
            prompt = front.session_prompt(session, given)
        else:
            prompt = front.encode(given) if which == "text" else given
        text = given if which == "text" else None
        params = self.params(request.params, prompt, session)

        def record(out: RequestOutput) -> None:
            front.record_completion(session, text, prompt, out, params)

        async for response in self.run(request.request_id, prompt, params, session, record):
            yield response

    async def Chat(self, request: pb.ChatRequest, metadata) -> AsyncIterator[pb.GenerateResponse]:
        front = self.front
        key = self.authorize(metadata)
        front.check_model(request.model)
        session = front.session(request.session_id, key)
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        if any(m["role"] not in ("system", "user", "assistant") for m in messages):
            raise RequestError(400, "a message's role must be system, user or assistant", param="messages")
        prompt, text = front.chat_prompt(messages, session)
        params = self.params(request.params, prompt, session)

        def record(out: RequestOutput) -> None:
            front.record_chat(session, messages, text, prompt, out, params)

        async for response in self.run(request.request_id, prompt, params, session, record):
            yield response

    async def Abort(self, request: pb.AbortRequest, metadata) -> pb.AbortResponse:
        """Ends the call streaming that request with CANCELLED, and so aborts its generation."""
        self.authorize(metadata)
        call = self.running.pop(request.request_id, None)
        if call is not None:
            call.abort()
        return pb.AbortResponse(found=call is not None)

    async def Tokenize(self, request: pb.TokenizeRequest, metadata) -> pb.TokenizeResponse:
        self.authorize(metadata)
        front = self.front
        which = request.WhichOneof("input")
        if which is None:
            raise RequestError(400, "give 'text' or 'chat'")
        if which == "text":
            ids = front.encode(request.text, request.add_special_tokens)
        else:
            ids = front.chat_prompt([{"role": m.role, "content": m.content} for m in request.chat.messages], None)[0]
        return pb.TokenizeResponse(token_ids=ids, max_model_len=front.max_len)

    async def CreateSession(self, request: pb.CreateSessionRequest, metadata) -> pb.Session:
        key = self.authorize(metadata)
        ttl = request.ttl_s if request.HasField("ttl_s") else None
        if ttl is not None and not 0 < ttl <= 7 * 24 * 3600:
            raise RequestError(400, "ttl_s must be in (0, 604800] seconds", param="ttl_s")
        session = self.front.sessions.create(key, ttl)
        return pb.Session(session_id=session.session_id, ttl_s=session.ttl_s, num_tokens=0,
                          max_model_len=self.front.max_len)

    async def DeleteSession(self, request: pb.DeleteSessionRequest, metadata) -> pb.DeleteSessionResponse:
        key = self.authorize(metadata)
        await self.front.end_session(request.session_id, key)
        return pb.DeleteSessionResponse(deleted=True)

    # --- shared ---

    def params(self, p: pb.SamplingParams, prompt: list[int], session: Session | None) -> SamplingParams:
        requested = p.max_tokens if p.HasField("max_tokens") else None
        max_tokens = self.front.max_tokens([prompt], requested, session)
        given = {f: getattr(p, f) for f in SAMPLING_FIELDS if p.HasField(f)}
        try:
            return SamplingParams(max_tokens=max_tokens, stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids),
                                  ignore_eos=p.ignore_eos, include_stop_str_in_output=p.include_stop_str_in_output,
                                  logprobs=p.logprobs if p.HasField("logprobs") else None, **given)
        except ValueError as e:
            raise RequestError(400, str(e)) from None

    async def run(self, request_id: str, prompt: list[int], params: SamplingParams, session: Session | None,
                  record) -> AsyncIterator[pb.GenerateResponse]:
        rid = request_id or f"grpc-{uuid.uuid4().hex}"
        if rid in self.running:
            raise RequestError(400, f"request id {rid!r} is already running; give each request its own")
        streams, _ = await self.front.submit([prompt], params, rid, session)
        call = self.running[rid] = Running(asyncio.current_task())
        outputs = aiter(streams[0])
        final = None
        try:
            while True:
                call.waiting = True
                try:
                    out = await anext(outputs)
                except StopAsyncIteration:
                    break
                finally:
                    call.waiting = False
                final = out if final is None else final.merge(out)
                c = out.outputs[0]
                response = pb.GenerateResponse(request_id=rid, token_ids=c.token_ids, text=c.text,
                                               finish_reason=c.finish_reason or "",
                                               logprobs=[logprob(lp) for lp in c.logprobs or ()])
                if out.finished:
                    record(final)
                    response.usage.CopyFrom(pb.Usage(prompt_tokens=len(prompt),
                                                     completion_tokens=len(final.outputs[0].token_ids),
                                                     cached_tokens=final.num_cached_tokens))
                yield response
                if call.aborted:
                    raise RequestError(499, f"request {rid} was aborted by an Abort call")
        except asyncio.CancelledError:
            if not call.aborted:
                raise  # the client went away, or its deadline passed
            raise RequestError(499, f"request {rid} was aborted by an Abort call") from None
        finally:
            if self.running.get(rid) is call:
                del self.running[rid]
            for s in streams:
                await s.aclose()
            self.front.end_turn(session)


class Running:
    """A call streaming a request, for Abort to end. While it waits on the engine it is cancelled there; else it
    is told, and stops when grpc takes its next message: a cancellation that lands while grpc sends one is lost
    (grpc then ends the call with no status at all, and the client waits for one forever)."""

    def __init__(self, task: asyncio.Task):
        self.task = task
        self.waiting = False  # on the engine's next output
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        if self.waiting:
            self.task.cancel()


def logprob(lp) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob, top_token_ids=[t for t, _ in lp.top],
                           top_logprobs=[v for _, v in lp.top])
