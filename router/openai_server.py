"""The OpenAI-compatible HTTP front door (FastAPI), over an engine client (an AsyncEngine in this process, or the
Ray Serve engine replicas through EngineHandle).

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

import hmac
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from router.async_engine import EngineBusy
from router.body_limit import BodyLimit
from router.metrics import Metrics
from router.openai_errors import HTTPError, error_body
from router.openai_protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SamplingFields,
                                    SessionRequest, TokenizeRequest)
from router.openai_responses import (chat_chunks, chat_logprobs, close_all, completion_chunks, completion_logprobs,
                                     generate_all, sse, unless_disconnected, usage)
from router.request_output import RequestOutput
from router.session_store import Session, SessionError, SessionStore
from workers.sampling_params import SamplingParams

FIM_TOKENS = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")  # DeepSeek-Coder's, V1 and V2
SESSION_HEADER = "x-session-id"
PUBLIC_PATHS = ("/health", "/metrics", "/docs", "/openapi.json")


@dataclass(frozen=True)
class ServerLimits:
    api_keys: tuple[str, ...] = ()  # Bearer keys for /v1, /tokenize and /detokenize; none: open
    max_body_bytes: int = 8 * 2**20  # larger request bodies get 413
    retry_after_s: int = 1  # told to clients refused with 429 (the engine's queue is full)


def build_app(engine, model_name: str, limits: ServerLimits = ServerLimits(),
              sessions: SessionStore | None = None) -> FastAPI:
    """engine: AsyncEngine or EngineHandle (submit, stats, end_session, tokenizer, model_config, max_model_len)."""
    app = FastAPI(title="moe-serve", description="OpenAI-compatible API for DeepSeek models")
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    metrics = Metrics(engine.stats, model_name)
    sessions = sessions or SessionStore()
    tokenizer = engine.tokenizer
    max_len = engine.max_model_len

    @app.exception_handler(HTTPError)
    async def _http_error(_, e: HTTPError):
        headers = {"Retry-After": str(limits.retry_after_s)} if e.status == 429 else None
        return JSONResponse(error_body(e.message, e.kind, e.status, e.param), status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        return JSONResponse(error_body(message, "invalid_request_error", 400, where or None), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if limits.api_keys and request.url.path not in PUBLIC_PATHS:
            key = api_key(request)
            if key is None or not any(hmac.compare_digest(key, k) for k in limits.api_keys):
                return JSONResponse(error_body("missing or wrong API key: send 'Authorization: Bearer <key>'",
                                               "authentication_error", 401), status_code=401)
        return await call_next(request)

    # --- prompts ---

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise HTTPError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                            "not_found_error", "model")

    def need_tokenizer() -> None:
        if tokenizer is None:
            raise HTTPError(400, "this model ships no tokenizer: give token ids as the prompt")

    def encode(text: str, add_special_tokens: bool = True) -> list[int]:
        need_tokenizer()
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def fim_encode(suffix: str):
        """Fill-in-the-middle: the prompt is the code before the hole, `suffix` the code after it, in the model's
        own FIM tokens (DeepSeek-Coder: <｜fim▁begin｜>before<｜fim▁hole｜>after<｜fim▁end｜>)."""
        need_tokenizer()
        vocab = tokenizer.get_vocab()
        if any(t not in vocab for t in FIM_TOKENS):
            raise HTTPError(400, "this model has no fill-in-the-middle tokens, so 'suffix' cannot be used",
                            param="suffix")
        begin, hole, end = FIM_TOKENS

        return lambda prefix: tokenizer.encode(f"{begin}{prefix}{hole}{suffix}{end}")

    def chat_text(messages: list[dict], add_generation_prompt: bool = True) -> str:
        need_tokenizer()
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)

    def chat_ids(text: str) -> list[int]:
        return encode(text, add_special_tokens=False)  # the template writes the BOS itself

    def params_for(req: SamplingFields, prompts: list[list[int]], max_tokens: int | None, logprobs: int | None,
                   session: Session | None = None) -> SamplingParams:
        longest = max(len(p) for p in prompts)
        if longest >= max_len:
            held = f"session {session.session_id} has grown to {longest} tokens with this turn; " if session else \
                f"the prompt has {longest} tokens; "
            fix = "start a new session" if session else f"send at most {max_len - 1} prompt tokens"
            raise HTTPError(400, f"{held}this model's context is {max_len} tokens: {fix}", param="prompt")
        room = max_len - longest
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise HTTPError(400, f"max_tokens is {max_tokens}, but the prompt ({longest} tokens) leaves room for "
                                 f"{room} in this model's {max_len}-token context", param="max_tokens")
        try:
            return req.sampling_params(max_tokens, logprobs)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None

    async def submit(prompts: list[list[int]], params: SamplingParams, rid: str, session: Session | None = None):
        """The engine takes every prompt, or none (then a 4xx says why). A session is busy from here until
        its turn ends (end_turn, or the stream's end)."""
        taken = []
        start_turn(session)
        try:
            for i, prompt in enumerate(prompts):
                stream = await engine.submit(prompt, params, f"{rid}-{i}",
                                             None if session is None else session.session_id)
                taken.append(metrics.observe(stream))
        except BaseException as e:
            end_turn(session)
            await close_all(taken)
            if isinstance(e, EngineBusy):
                raise HTTPError(429, str(e), "rate_limit_error") from None
            if isinstance(e, ValueError):
                raise HTTPError(400, str(e)) from None
            raise
        return taken

    def echo_text(prompt: list[int], text: str | None, params: SamplingParams) -> str:
        """The prompt as given, or, for token ids, their text."""
        if text is not None:
            return text
        need_tokenizer()
        return tokenizer.decode(prompt, skip_special_tokens=params.skip_special_tokens)

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)

    # --- sessions ---

    def session_of(request: Request) -> Session | None:
        session_id = request.headers.get(SESSION_HEADER)
        if session_id is None:
            return None
        try:
            session = sessions.get(session_id, api_key(request))
        except SessionError as e:
            raise HTTPError(410 if e.expired else 404, str(e), "session_expired" if e.expired else
                            "not_found_error") from None
        if session.busy:
            raise HTTPError(409, f"session {session_id} is already running a turn; wait for it to finish")
        return session

    def exact_tokens(out: RequestOutput, params: SamplingParams) -> bool:
        """Whether the output's tokens match its text (not cut at a stop string)."""
        c = out.outputs[0]
        return c.finish_reason == "length" or (c.token_ids and (c.token_ids[-1] in params.stop_token_ids or
                                                                c.token_ids[-1] == eos_id()))

    def eos_id() -> int | None:
        return None if tokenizer is None else tokenizer.eos_token_id

    async def with_session(session: Session | None, chunks):
        """A streamed turn: the session is free again when the stream ends, however it ends."""
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()
            if session is not None:
                session.busy = False

    @app.post("/v1/sessions")
    async def create_session(req: SessionRequest, request: Request):
        session = sessions.create(api_key(request), req.ttl_s)
        return session_body(session)

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str, request: Request):
        try:
            return session_body(sessions.get(session_id, api_key(request)))
        except SessionError as e:
            raise HTTPError(410 if e.expired else 404, str(e), "not_found_error") from None

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, request: Request):
        try:
            session = sessions.delete(session_id, api_key(request))
        except SessionError as e:
            raise HTTPError(410 if e.expired else 404, str(e), "not_found_error") from None
        await engine.end_session(session.session_id)
        return {"id": session.session_id, "object": "session", "deleted": True}

    def session_body(session: Session) -> dict:
        return {"id": session.session_id, "object": "session", "ttl_s": session.ttl_s,
                "num_tokens": len(session.token_ids), "max_model_len": max_len}

    # --- endpoints ---

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "moe-serve", "max_model_len": max_len}]}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise HTTPError(400, "give exactly one of 'prompt' or 'messages'")
        ids = encode(req.prompt, req.add_special_tokens) if req.prompt is not None else \
            chat_ids(chat_text([m.model_dump() for m in req.messages]))
        return {"tokens": ids, "count": len(ids), "max_model_len": max_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        need_tokenizer()
        vocab = engine.model_config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise HTTPError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        session = session_of(request)
        if req.suffix is not None and not (isinstance(req.prompt, str) or all(isinstance(p, str) for p in req.prompt)):
            raise HTTPError(400, "with 'suffix', the prompt must be text", param="prompt")
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise HTTPError(400, f"logprobs must be in [0, 20], got {req.logprobs}", param="logprobs")
        if session is not None:
            if req.suffix is not None or req.n != 1 or not isinstance(req.prompt, str) and \
                    not all(isinstance(p, int) for p in req.prompt):
                raise HTTPError(400, "a session turn has one prompt (text or token ids), n = 1 and no suffix")
            prompts, texts = [session_prompt(session, req.prompt)], [req.prompt if isinstance(req.prompt, str)
                                                                      else None]
        else:
            prompts, texts = completion_prompts(req.prompt, encode if req.suffix is None else fim_encode(req.suffix))
        params = params_for(req, prompts, 16 if req.max_tokens is None else req.max_tokens, req.logprobs, session)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "text_completion", "created": created, "model": model_name}

        def record(outs: list[RequestOutput]) -> None:
            if session is None:
                return
            out = outs[0]
            if texts[0] is None or not exact_tokens(out, params):
                session.record("", prompts[0])
            else:
                session.record(texts[0] + out.outputs[0].text, prompts[0] + out.outputs[0].token_ids)

        outputs = await submit(prompts, params, rid, session)
        if req.stream:
            echoes = [echo_text(p, t, params) for p, t in zip(prompts, texts)] if req.echo else None
            return sse(with_session(session, completion_chunks(outputs, base, params.n, [len(p) for p in prompts],
                                                               req.include_usage, token_text, echoes, record)))
        try:
            outs = await unless_disconnected(request, generate_all(outputs))
            record(outs)
        finally:
            end_turn(session)
        choices = []
        for i, (prompt, text, out) in enumerate(zip(prompts, texts, outs)):
            prefix = echo_text(prompt, text, params) if req.echo else ""
            for c in out.outputs:
                choice = {"index": i * params.n + c.index, "text": prefix + c.text,
                          "logprobs": completion_logprobs(c, token_text), "finish_reason": c.finish_reason}
                if req.return_token_ids:
                    choice.update(prompt_token_ids=prompt, token_ids=c.token_ids)
                choices.append(choice)
        return {**base, "choices": choices, "usage": usage([len(p) for p in prompts], outs)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        session = session_of(request)
        if req.top_logprobs is not None and not req.logprobs:
            raise HTTPError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if session is not None and req.n != 1:
            raise HTTPError(400, "a session turn has n = 1", param="n")
        messages = [m.model_dump() for m in req.messages]
        text = chat_text(messages)
        prompt = chat_ids(text) if session is None else session.prompt_for(text, chat_ids, chat_ids)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = params_for(req, [prompt], max_tokens, logprobs, session)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}

        def record(outs: list[RequestOutput]) -> None:
            if session is None:
                return
            c = outs[0].outputs[0]
            if not exact_tokens(outs[0], params):
                session.record(text, prompt)
                return
            ids = prompt + c.token_ids
            if ids[-1] != eos_id() and eos_id() is not None:
                ids.append(eos_id())  # the template closes an assistant turn with EOS
            session.record(chat_text(messages + [{"role": "assistant", "content": c.text}], False), ids)

        outputs = await submit([prompt], params, rid, session)
        if req.stream:
            return sse(with_session(session, chat_chunks(outputs, base, params.n, len(prompt), req.include_usage,
                                                         token_text, record)))
        try:
            (out,) = await unless_disconnected(request, generate_all(outputs))
            record([out])
        finally:
            end_turn(session)
        choices = []
        for c in out.outputs:
            choice = {"index": c.index, "message": {"role": "assistant", "content": c.text},
                      "logprobs": chat_logprobs(c, token_text), "finish_reason": c.finish_reason}
            if req.return_token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        body = {**base, "object": "chat.completion", "choices": choices, "usage": usage([len(prompt)], [out])}
        if req.return_token_ids:
            body["prompt_token_ids"] = prompt
        return body

    def session_prompt(session: Session, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return session.prompt_for(prompt, lambda rest: encode(rest, False), encode)
        return list(prompt)

    return app


def start_turn(session: Session | None) -> Session | None:
    if session is not None:
        session.busy = True
    return session


def end_turn(session: Session | None) -> None:
    if session is not None:
        session.busy = False


def api_key(request: Request) -> str | None:
    given = request.headers.get("authorization", "")
    return given[len("Bearer "):] if given.startswith("Bearer ") else None


def completion_prompts(prompt, encode) -> tuple[list[list[int]], list[str | None]]:
    """The OpenAI prompt forms (text, token ids, or a list of either) -> token id lists, and each one's text."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif not prompt:
        raise HTTPError(400, "the prompt is empty", param="prompt")
    elif all(isinstance(p, int) for p in prompt):
        prompt = [prompt]
    ids = [list(p) if isinstance(p, list) else encode(p) for p in prompt]
    if any(not p for p in ids):
        raise HTTPError(400, "a prompt in the list is empty", param="prompt")
    return ids, [p if isinstance(p, str) else None for p in prompt]
