"""OpenAI response bodies from engine outputs: whole (generate_all) or as SSE chunks (completion_chunks,
chat_chunks), with usage and logprobs in OpenAI's shapes.

Each request's prompts have already been taken by the engine; their output streams come in here. Whatever happens
to the consumer (it finishes, fails, or is cancelled by a client that left), every stream is closed, which aborts
the requests still running.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from router.async_engine import EngineError
from router.request_error import RequestError, error_body
from router.request_output import CompletionOutput, RequestOutput

Outputs = AsyncIterator[RequestOutput]


async def generate_all(outputs: list[Outputs]) -> list[RequestOutput]:
    """Every stream to its end, concurrently; each one's merged output."""
    async def one(stream: Outputs) -> RequestOutput:
        merged = None
        async for out in stream:
            merged = out if merged is None else merged.merge(out)
        return merged

    try:
        return list(await asyncio.gather(*(one(s) for s in outputs)))
    except EngineError as e:
        raise RequestError(500, str(e), "server_error") from None
    finally:
        await close_all(outputs)


async def close_all(outputs: list[Outputs]) -> None:
    for s in outputs:
        await s.aclose()


async def unless_disconnected(request: Request, work):
    """Awaits work, but cancels it (aborting its requests) if the client goes away first."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            raise RequestError(499, "the client closed the connection")


async def merged_streams(outputs: list[Outputs]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) as they come, from all streams at once; closing it aborts them all."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    reading: set[int] = set()  # streams a pump is inside of: cancelling that pump closes them as it unwinds

    async def pump(i: int, stream: Outputs) -> None:
        reading.add(i)
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            await queue.put(e)
        finally:
            reading.discard(i)
        await queue.put(done)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(outputs)]
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
            t.cancel()
        # the others (a pump not started, or done): closing one a pump is inside of would find it running
        await close_all([s for i, s in enumerate(outputs) if i not in reading])


def sse(chunks: AsyncIterator[dict], replica: str | None = None) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except EngineError as e:
            yield f"data: {json.dumps(error_body(str(e), 'server_error', 500))}\n\n"
        finally:
            await chunks.aclose()
        yield "data: [DONE]\n\n"

    headers = None if replica is None else {"x-moe-serve-replica": replica}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def completion_chunks(outputs: list[Outputs], base: dict, n: int, prompt_lens: list[int],
                            include_usage: bool, token_text, echoes: list[str] | None,
                            on_finish: Callable[[list[RequestOutput]], None] | None = None) -> AsyncIterator[dict]:
    finals: dict[int, RequestOutput] = {}
    for i, echo in enumerate(echoes or []):
        for j in range(n):
            yield {**base, "choices": [{"index": i * n + j, "text": echo, "logprobs": None, "finish_reason": None}]}
    async for i, out in merged_streams(outputs):
        finals[i] = out if i not in finals else finals[i].merge(out)
        choices = [{"index": i * n + c.index, "text": c.text, "logprobs": completion_logprobs(c, token_text),
                    "finish_reason": c.finish_reason} for c in out.outputs]
        yield {**base, "choices": choices}
    ordered = [finals[i] for i in range(len(outputs))]
    if on_finish is not None:
        on_finish(ordered)
    if include_usage:
        yield {**base, "choices": [], "usage": usage(prompt_lens, ordered)}


async def chat_chunks(outputs: list[Outputs], base: dict, n: int, prompt_len: int, include_usage: bool, token_text,
                      on_finish: Callable[[list[RequestOutput]], None] | None = None) -> AsyncIterator[dict]:
    final = None
    for j in range(n):
        yield {**base, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}
    async for _, out in merged_streams(outputs):
        final = out if final is None else final.merge(out)
        choices = [{"index": c.index, "delta": {"content": c.text} if c.text else {},
                    "logprobs": chat_logprobs(c, token_text), "finish_reason": c.finish_reason}
                   for c in out.outputs]
        yield {**base, "choices": choices}
    if on_finish is not None:
        on_finish([final])
    if include_usage:
        yield {**base, "choices": [], "usage": usage([prompt_len], [final])}


def usage(prompt_lens: list[int], outs: list[RequestOutput]) -> dict:
    prompt_tokens = sum(prompt_lens)
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
