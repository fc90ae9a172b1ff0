"""The OpenAI-compatible HTTP front door (FastAPI), over an AsyncEngine.

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (both streaming over SSE), /health, /metrics
(Prometheus), /tokenize, /detokenize, and the OpenAPI schema at /openapi.json. Bad input is a 4xx with OpenAI's error body, saying what to
fix; a client that disconnects aborts its generation (the engine stream's close does it).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from router.async_engine import AsyncEngine, EngineError
from router.metrics import Metrics
from router.openai_protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, SamplingFields,
                                    TokenizeRequest)
from router.request_output import CompletionOutput, RequestOutput
from workers.sampling_params import SamplingParams


FIM_TOKENS = ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>")  # DeepSeek-Coder's, V1 and V2


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


@dataclass(frozen=True)
class ServerLimits:
    api_keys: tuple[str, ...] = ()  # Bearer keys for /v1, /tokenize and /detokenize; none: open
    max_waiting: int = 1024  # queued sequences beyond which new requests get 429 with Retry-After
    max_body_bytes: int = 8 * 2**20  # larger request bodies get 413
    retry_after_s: int = 1


def build_app(engine: AsyncEngine, model_name: str, limits: ServerLimits = ServerLimits()) -> FastAPI:
    app = FastAPI(title="moe-serve", description="OpenAI-compatible API for DeepSeek models")
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    core = engine.engine
    metrics = Metrics(engine.stats, model_name)

    def generate(prompt: list[int], params: SamplingParams, request_id: str) -> AsyncIterator[RequestOutput]:
        return metrics.observe(engine.generate(prompt, params, request_id))
    tokenizer = core.tokenizer
    max_len = core.max_model_len

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
        public = request.url.path in ("/health", "/metrics", "/docs", "/openapi.json")
        if limits.api_keys and not public:
            given = request.headers.get("authorization", "")
            key = given[len("Bearer "):] if given.startswith("Bearer ") else None
            if key is None or not any(hmac.compare_digest(key, k) for k in limits.api_keys):
                return JSONResponse(error_body("missing or wrong API key: send 'Authorization: Bearer <key>'",
                                               "authentication_error", 401), status_code=401)
        return await call_next(request)

    def admit() -> None:
        if engine.stats().waiting >= limits.max_waiting:
            raise HTTPError(429, f"the server is busy ({limits.max_waiting} requests queued); retry shortly",
                            "rate_limit_error")

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

    def chat_ids(messages) -> list[int]:
        need_tokenizer()
        text = tokenizer.apply_chat_template([m.model_dump() for m in messages], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)  # the template writes the BOS itself

    def params_for(req: SamplingFields, prompts: list[list[int]], max_tokens: int | None,
                   logprobs: int | None) -> SamplingParams:
        longest = max(len(p) for p in prompts)
        if longest >= max_len:
            raise HTTPError(400, f"the prompt has {longest} tokens; this model's context is {max_len} tokens, "
                                 f"so at most {max_len - 1} prompt tokens", param="prompt")
        room = max_len - longest
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise HTTPError(400, f"max_tokens is {max_tokens}, but the prompt ({longest} tokens) leaves room for "
                                 f"{room} in this model's {max_len}-token context", param="max_tokens")
        try:
            params = req.sampling_params(max_tokens, logprobs)
            for p in prompts:
                core.validate(p, params)
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        return params

    def echo_text(prompt: list[int], text: str | None, params: SamplingParams) -> str:
        """The prompt as given, or, for token ids, their text."""
        if text is not None:
            return text
        need_tokenizer()
        return tokenizer.decode(prompt, skip_special_tokens=params.skip_special_tokens)

    def token_text(token_id: int) -> str:
        return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)

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
        ids = encode(req.prompt, req.add_special_tokens) if req.prompt is not None else chat_ids(req.messages)
        return {"tokens": ids, "count": len(ids), "max_model_len": max_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        check_model(req.model)
        need_tokenizer()
        vocab = core.model_config.vocab_size
        if any(not 0 <= t < vocab for t in req.tokens):
            raise HTTPError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        admit()
        if req.suffix is not None and not (isinstance(req.prompt, str) or all(isinstance(p, str) for p in req.prompt)):
            raise HTTPError(400, "with 'suffix', the prompt must be text", param="prompt")
        prompts, texts = completion_prompts(req.prompt, encode if req.suffix is None else fim_encode(req.suffix))
        if req.logprobs is not None and not 0 <= req.logprobs <= 20:
            raise HTTPError(400, f"logprobs must be in [0, 20], got {req.logprobs}", param="logprobs")
        params = params_for(req, prompts, 16 if req.max_tokens is None else req.max_tokens, req.logprobs)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            echoes = [echo_text(p, t, params) for p, t in zip(prompts, texts)] if req.echo else None
            return sse(completion_chunks(generate, prompts, params, rid, created, model_name, req, token_text, echoes))
        outs = await unless_disconnected(request, generate_all(generate, prompts, params, rid))
        choices = []
        for i, (prompt, text, out) in enumerate(zip(prompts, texts, outs)):
            prefix = echo_text(prompt, text, params) if req.echo else ""
            for c in out.outputs:
                choices.append({"index": i * params.n + c.index, "text": prefix + c.text,
                                "logprobs": completion_logprobs(c, token_text), "finish_reason": c.finish_reason})
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(prompts, outs)}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        admit()
        if req.top_logprobs is not None and not req.logprobs:
            raise HTTPError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        prompts = [chat_ids(req.messages)]
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = params_for(req, prompts, max_tokens, logprobs)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            return sse(chat_chunks(generate, prompts[0], params, rid, created, model_name, req, token_text))
        (out,) = await unless_disconnected(request, generate_all(generate, prompts, params, rid))
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(c, token_text), "finish_reason": c.finish_reason}
                   for c in out.outputs]
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage(prompts, [out])}

    return app


class BodyLimit:
    """ASGI middleware: a request body over max_bytes gets 413, declared (Content-Length) or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except BodyTooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps(error_body(f"the request body is over {self.max_bytes} bytes", "invalid_request_error",
                                     413)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class BodyTooLarge(Exception):
    pass


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


async def generate_all(generate, prompts: list[list[int]], params: SamplingParams,
                       rid: str) -> list[RequestOutput]:
    """Every prompt to completion, concurrently; each one's merged output."""
    async def one(i: int, prompt: list[int]) -> RequestOutput:
        merged = None
        async for out in generate(prompt, params, f"{rid}-{i}"):
            merged = out if merged is None else merged.merge(out)
        return merged

    try:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
    except EngineError as e:
        raise HTTPError(500, str(e), "server_error") from None


async def unless_disconnected(request: Request, work):
    """Awaits work, but cancels it (aborting its requests) if the client goes away first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise HTTPError(499, "the client closed the connection")


async def streams(generate, prompts: list[list[int]], params: SamplingParams,
                  rid: str) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) as they come, from all prompts at once; closing it aborts them all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, prompt: list[int]) -> None:
        try:
            async for out in generate(prompt, params, f"{rid}-{i}"):
                await queue.put((i, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put(e)
        await queue.put(done)

    tasks = [asyncio.create_task(pump(i, p)) for i, p in enumerate(prompts)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()  # a client that went away: each engine stream closes, which aborts its request


def sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except EngineError as e:
            yield f"data: {json.dumps(error_body(str(e), 'server_error', 500))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")


async def completion_chunks(generate, prompts, params, rid, created, model, req, token_text,
                            echoes: list[str] | None) -> AsyncIterator[dict]:
    base = {"id": rid, "object": "text_completion", "created": created, "model": model}
    finals: dict[int, RequestOutput] = {}
    for i, echo in enumerate(echoes or []):
        for j in range(params.n):
            yield {**base, "choices": [{"index": i * params.n + j, "text": echo, "logprobs": None,
                                        "finish_reason": None}]}
    async for i, out in streams(generate, prompts, params, rid):
        finals[i] = out if i not in finals else finals[i].merge(out)
        choices = [{"index": i * params.n + c.index, "text": c.text,
                    "logprobs": completion_logprobs(c, token_text), "finish_reason": c.finish_reason}
                   for c in out.outputs]
        yield {**base, "choices": choices}
    if req.include_usage:
        yield {**base, "choices": [], "usage": usage(prompts, [finals[i] for i in range(len(prompts))])}


async def chat_chunks(generate, prompt, params, rid, created, model, req, token_text) -> AsyncIterator[dict]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    final = None
    for j in range(params.n):
        yield {**base, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}
    async for _, out in streams(generate, [prompt], params, rid):
        final = out if final is None else final.merge(out)
        choices = [{"index": c.index, "delta": {"content": c.text} if c.text else {},
                    "logprobs": chat_logprobs(c, token_text), "finish_reason": c.finish_reason}
                   for c in out.outputs]
        yield {**base, "choices": choices}
    if req.include_usage:
        yield {**base, "choices": [], "usage": usage([prompt], [final])}


def usage(prompts: list[list[int]], outs: list[RequestOutput]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outs)}}


def completion_logprobs(c: CompletionOutput, token_text) -> dict | None:
    if c.logprobs is None:
        return None
    tokens = [token_text(lp.token_id) for lp in c.logprobs]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in c.logprobs],
            "top_logprobs": [{token_text(t): v for t, v in lp.top} for lp in c.logprobs], "text_offset": offsets}


def chat_logprobs(c: CompletionOutput, token_text) -> dict | None:
    if c.logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8", "surrogatepass"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in c.logprobs]}
