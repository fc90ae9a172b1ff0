"""The OpenAI-compatible HTTP front door (FastAPI), over an engine client: an AsyncEngine in this process, or the
Ray Serve engine replicas through EngineHandle.

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (both streaming over SSE), /v1/sessions, /health,
/metrics (Prometheus), /tokenize, /detokenize, and the OpenAPI schema at /openapi.json. Bad input is a 4xx with
OpenAI's error body, saying what to fix; a client that disconnects aborts its generation (closing the engine
stream does it).

Sessions: POST /v1/sessions makes one; a request carries it in the X-Session-ID header and sends the whole
conversation. The session's own tokens stand for the part it has seen (router/session_store.py), the engine keeps
that history pinned in its cache, and the next turn prefills only what is new (usage.prompt_tokens_details.
cached_tokens says how much was reused).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from router.api_key_auth import ApiKeyAuth, bearer
from router.body_limit import BodyLimit, HeaderLimit
from router.frontend import Frontend, session_error
from router.metrics import Metrics
from router.openai_protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SessionRequest,
                                    TokenizeRequest)
from router.openai_responses import (chat_chunks, chat_logprobs, completion_chunks, completion_logprobs,
                                     generate_all, sse, unless_disconnected, usage)
from router.request_error import RequestError, error_body
from router.session_store import Session, SessionError, SessionStore

SESSION_HEADER = "x-session-id"  # the header Ray Serve's session routing reads too
REPLICA_HEADER = "x-moe-serve-replica"  # which engine replica served the request
PUBLIC_PATHS = ("/health", "/metrics", "/docs", "/openapi.json")


@dataclass(frozen=True)
class ServerLimits:
    api_keys: tuple[str, ...] = ()  # Bearer keys for /v1, /tokenize and /detokenize; none: open
    max_body_bytes: int = 8 * 2**20  # larger request bodies get 413
    max_header_bytes: int = 32 * 2**10  # more header bytes (names and values) get 431
    max_headers: int = 100  # more header lines get 431
    retry_after_s: int = 1  # told to clients refused with 429 (the engine's queue is full)


def build_app(engine, model_name: str, limits: ServerLimits = ServerLimits(), sessions: SessionStore | None = None,
              metrics: Metrics | None = None) -> FastAPI:
    """engine: AsyncEngine or EngineHandle (submit, stats, end_session, tokenizer, model_config, max_model_len)."""
    app = FastAPI(title="moe-serve", description="OpenAI-compatible API for DeepSeek models")
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(HeaderLimit, max_bytes=limits.max_header_bytes, max_count=limits.max_headers)
    metrics = metrics or Metrics(engine, model_name)
    front = Frontend(engine, model_name, sessions or SessionStore(), metrics.observe)

    @app.exception_handler(RequestError)
    async def _refused(_, e: RequestError):
        headers = {"Retry-After": str(limits.retry_after_s)} if e.status == 429 else None
        return JSONResponse(error_body(e.message, e.kind, e.status, e.param), status_code=e.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def _routing(_, e: HTTPException):  # unknown paths, wrong methods: OpenAI's error body too
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", e.status_code), status_code=e.status_code,
                            headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        errors = e.errors()  # a union gives one per member; a failed check of ours says the most
        first = next((x for x in errors if x.get("type") == "value_error"), errors[0] if errors else {})
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and "[" not in str(p))
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(message, "invalid_request_error", 400, where or None), status_code=400)

    if limits.api_keys:  # outermost: checked before the size limits, as before
        app.add_middleware(ApiKeyAuth, keys=limits.api_keys, public_paths=PUBLIC_PATHS)

    def caller(request: Request) -> str | None:
        """Whose sessions these are: the API key, when the server has keys (then it has been checked)."""
        return api_key(request) if limits.api_keys else None

    def session_of(request: Request) -> Session | None:
        return front.session(request.headers.get(SESSION_HEADER), caller(request))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "moe-serve", "max_model_len": front.max_len}]}

    @app.post("/v1/sessions")
    async def create_session(req: SessionRequest, request: Request):
        return session_body(front.sessions.create(caller(request), req.ttl_s), front.max_len)

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str, request: Request):
        try:
            return session_body(front.sessions.get(session_id, caller(request)), front.max_len)
        except SessionError as e:
            raise session_error(e) from None

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, request: Request):
        await front.end_session(session_id, caller(request))
        return {"id": session_id, "object": "session", "deleted": True}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        front.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise RequestError(400, "give exactly one of 'prompt' or 'messages'")
        ids = front.encode(req.prompt, req.add_special_tokens) if req.prompt is not None else \
            front.chat_prompt([m.model_dump() for m in req.messages], None)[0]
        return {"tokens": ids, "count": len(ids), "max_model_len": front.max_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        front.check_model(req.model)
        front.need_tokenizer()
        vocab = engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise RequestError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": front.tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        front.check_model(req.model)
        session = session_of(request)
        text_only = isinstance(req.prompt, str) or all(isinstance(p, str) for p in req.prompt)
        if req.suffix is not None and not text_only:
            raise RequestError(400, "with 'suffix', the prompt must be text", param="prompt")
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise RequestError(400, f"logprobs must be in [0, 20], got {req.logprobs}", param="logprobs")
        if session is None:
            prompts, texts = completion_prompts(req.prompt, front.encode if req.suffix is None else
                                                front.fim_encoder(req.suffix))
        elif req.suffix is not None or req.n != 1 or not (isinstance(req.prompt, str) or
                                                          all(isinstance(p, int) for p in req.prompt)):
            raise RequestError(400, "a session turn has one prompt (text or token ids), n = 1 and no suffix")
        else:
            prompts = [front.session_prompt(session, req.prompt)]
            texts = [req.prompt if isinstance(req.prompt, str) else None]
        params = sampling(req, front.max_tokens(prompts, 16 if req.max_tokens is None else req.max_tokens, session),
                          req.logprobs)
        rid = f"cmpl-{uuid.uuid4().hex}"
        base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}

        def record(outs):
            front.record_completion(session, texts[0], prompts[0], outs[0], params)

        outputs, replica = await front.submit(prompts, params, rid, session)
        if req.stream:
            echoes = [front.echo_text(p, t, params) for p, t in zip(prompts, texts)] if req.echo else None
            chunks = completion_chunks(outputs, base, params.n, [len(p) for p in prompts], req.include_usage,
                                       front.token_text, echoes, record)
            return sse(turn(front, session, chunks), replica)
        try:
            outs = await unless_disconnected(request, generate_all(outputs))
            record(outs)
        finally:
            front.end_turn(session)
        choices = []
        for i, (prompt, text, out) in enumerate(zip(prompts, texts, outs)):
            prefix = front.echo_text(prompt, text, params) if req.echo else ""
            for c in out.outputs:
                choice = {"index": i * params.n + c.index, "text": prefix + c.text,
                          "logprobs": completion_logprobs(c, front.token_text), "finish_reason": c.finish_reason}
                if req.return_token_ids:
                    choice.update(prompt_token_ids=prompt, token_ids=c.token_ids)
                choices.append(choice)
        return with_replica({**base, "choices": choices, "usage": usage([len(p) for p in prompts], outs)}, replica)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        front.check_model(req.model)
        session = session_of(request)
        if req.top_logprobs is not None and not req.logprobs:
            raise RequestError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if session is not None and req.n != 1:
            raise RequestError(400, "a session turn has n = 1", param="n")
        messages = [m.model_dump() for m in req.messages]
        prompt, text = front.chat_prompt(messages, session)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = sampling(req, front.max_tokens([prompt], requested, session),
                          (req.top_logprobs or 0) if req.logprobs else None)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name}

        def record(outs):
            front.record_chat(session, messages, text, prompt, outs[0], params)

        outputs, replica = await front.submit([prompt], params, rid, session)
        if req.stream:
            chunks = chat_chunks(outputs, base, params.n, len(prompt), req.include_usage, front.token_text, record)
            return sse(turn(front, session, chunks), replica)
        try:
            (out,) = await unless_disconnected(request, generate_all(outputs))
            record([out])
        finally:
            front.end_turn(session)
        choices = []
        for c in out.outputs:
            choice = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                      "logprobs": chat_logprobs(c, front.token_text), "finish_reason": c.finish_reason}
            if req.return_token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        body = {**base, "object": "chat.completion", "choices": choices, "usage": usage([len(prompt)], [out])}
        if req.return_token_ids:
            body["prompt_token_ids"] = prompt
        return with_replica(body, replica)

    return app


def with_replica(body: dict, replica: str | None):
    """The body, with the engine replica that served it in a header (when there are replicas)."""
    return body if replica is None else JSONResponse(body, headers={REPLICA_HEADER: replica})


def sampling(req, max_tokens: int, logprobs: int | None):
    try:
        return req.sampling_params(max_tokens, logprobs)
    except ValueError as e:
        raise RequestError(400, str(e)) from None


async def turn(front: Frontend, session: Session | None, chunks):
    """A streamed turn: the session is free again when the stream ends, however it ends."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        await chunks.aclose()
        front.end_turn(session)


def session_body(session: Session, max_len: int) -> dict:
    return {"id": session.session_id, "object": "session", "ttl_s": session.ttl_s,
            "num_tokens": len(session.token_ids), "max_model_len": max_len}


def api_key(request: Request) -> str | None:
    return bearer(request.headers.get("authorization", ""))


def completion_prompts(prompt, encode) -> tuple[list[list[int]], list[str | None]]:
    """The OpenAI prompt forms (text, token ids, or a list of either) -> token id lists, and each one's text."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif not prompt:
        raise RequestError(400, "the prompt is empty", param="prompt")
    elif all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    ids = [list(p) if isinstance(p, list) else encode(p) for p in prompt]
    if any(not p for p in ids):
        raise RequestError(400, "a prompt in the list is empty", param="prompt")
    return ids, [p if isinstance(p, str) else None for p in prompt]
