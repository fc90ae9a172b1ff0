"""LoadGenerator: streams completion requests to one OpenAI-compatible server (ours, `vllm serve`, ...) and times
each one from its SSE stream.

Arrivals are all at once (closed loop: `concurrency` clients, each sending its next request when the last one
ends) or a seeded Poisson process at `request_rate` per second (open loop, still capped at `concurrency` in
flight). With `duration_s`, the closed loop's clients go round the requests until that time is up. A chunk that
carries tokens is one with choices; the usage chunk at the end has none.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
from tqdm import tqdm


@dataclass(frozen=True)
class BenchRequest:
    prompt: str | list[int]  # text, or token ids (an exact input length)
    max_tokens: int


@dataclass(frozen=True)
class RequestResult:
    prompt_tokens: int
    output_tokens: int  # the usage's completion_tokens, else the chunks that carried tokens
    ttft_s: float  # sent -> first chunk with tokens
    e2e_s: float  # sent -> end of the stream
    itl_s: tuple[float, ...]  # gaps between chunks with tokens
    error: str | None = None  # why it failed; None: completed
    sent_at: float = 0.0  # time.perf_counter() when it was sent
    text: str = ""  # the completion's text, as streamed

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first; None with fewer than two tokens."""
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1) if self.output_tokens > 1 else None


@dataclass(frozen=True)
class RunResult:
    concurrency: int  # most requests in flight
    request_rate: float | None  # Poisson arrivals per second; None: all at once
    duration_s: float  # first send -> last request ended
    results: tuple[RequestResult, ...]  # in request order


class LoadGenerator:
    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 600.0):
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # a server silent this long (to connect, or between bytes of a response) fails the request
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(headers=self.headers, timeout=self.timeout,
                                     connector=aiohttp.TCPConnector(limit=0))  # no cap below ours

    async def served_model(self) -> str:
        """The first model GET /v1/models lists; ValueError if there is none or the server cannot be reached."""
        url = f"{self.base_url}/v1/models"
        try:
            async with self._session() as http, http.get(url) as r:
                if r.status != 200:
                    raise ValueError(f"GET {url}: HTTP {r.status} {(await r.text())[:200]}")
                models = (await r.json()).get("data") or []
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise ValueError(f"cannot reach {url}: {e or type(e).__name__}") from None
        if not models:
            raise ValueError(f"{url} lists no models; give --model")
        return models[0]["id"]

    async def run(self, model: str, requests: list[BenchRequest], concurrency: int,
                  request_rate: float | None = None, seed: int = 0, duration_s: float | None = None) -> RunResult:
        if duration_s is not None:
            return await self._run_for(model, requests, concurrency, duration_s)
        gaps = random.Random(seed)
        slots = asyncio.Semaphore(concurrency)
        mode = "closed loop" if request_rate is None else f"Poisson {request_rate:g} req/s"
        bar = tqdm(total=len(requests), desc=f"concurrency {concurrency}, {mode}", unit="req")

        async def one(http: aiohttp.ClientSession, req: BenchRequest) -> RequestResult:
            async with slots:
                result = await self._send(http, model, req)
            bar.update()
            return result

        async with self._session() as http:
            t0 = time.perf_counter()
            tasks = []
            for req in requests:
                tasks.append(asyncio.create_task(one(http, req)))
                if request_rate is not None:
                    await asyncio.sleep(gaps.expovariate(request_rate))
            results = await asyncio.gather(*tasks)
            duration = time.perf_counter() - t0
        bar.close()
        return RunResult(concurrency, request_rate, duration, tuple(results))

    async def _run_for(self, model: str, requests: list[BenchRequest], concurrency: int,
                       duration_s: float) -> RunResult:
        """Closed loop for duration_s: each client sends the next request (round the list) as its last ends."""
        bar = tqdm(desc=f"concurrency {concurrency}, {duration_s:g} s", unit="req")
        turn = itertools.cycle(requests)
        results: list[RequestResult] = []
        t0 = time.perf_counter()

        async def client(http: aiohttp.ClientSession) -> None:
            while time.perf_counter() < t0 + duration_s:
                results.append(await self._send(http, model, next(turn)))
                bar.update()

        async with self._session() as http:
            await asyncio.gather(*(client(http) for _ in range(concurrency)))
        bar.close()
        return RunResult(concurrency, None, time.perf_counter() - t0, tuple(results))

    async def _send(self, http: aiohttp.ClientSession, model: str, req: BenchRequest) -> RequestResult:
        body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        stamps: list[float] = []  # perf_counter() at each chunk with tokens
        usage, done, text = None, False, []
        start = time.perf_counter()

        def failed(why: str) -> RequestResult:
            return RequestResult(0, 0, 0.0, time.perf_counter() - start, (), why, start, "".join(text))

        try:
            async with http.post(f"{self.base_url}/v1/completions", json=body) as r:
                if r.status != 200:
                    return failed(f"HTTP {r.status}: {(await r.text())[:200]}")
                async for at, data in sse_data(r.content):
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        return failed(f"error in stream: {chunk['error'].get('message', chunk['error'])}")
                    if chunk.get("choices"):
                        stamps.append(at)
                        text.append(chunk["choices"][0].get("text", ""))
                    usage = chunk.get("usage") or usage
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            return failed(f"{type(e).__name__}: {e}")
        end = time.perf_counter()
        if not done:
            return failed("the stream ended before [DONE]")
        if not stamps:
            return failed("no tokens came back")
        usage = usage or {}
        prompt_tokens = usage.get("prompt_tokens", len(req.prompt) if isinstance(req.prompt, list) else 0)
        output_tokens = usage.get("completion_tokens", len(stamps))
        itl = tuple(b - a for a, b in itertools.pairwise(stamps))
        return RequestResult(prompt_tokens, output_tokens, stamps[0] - start, end - start, itl, None, start,
                             "".join(text))


async def sse_data(content: aiohttp.StreamReader) -> AsyncIterator[tuple[float, str]]:
    """(arrival time, payload) of each `data:` line of a server-sent event stream, as the bytes arrive."""
    pending = b""
    async for piece in content.iter_any():
        at = time.perf_counter()
        *lines, pending = (pending + piece).split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield at, line[5:].strip().decode()
