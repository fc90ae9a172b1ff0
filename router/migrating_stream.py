"""MigratingStream: a request's outputs, unbroken across the loss of the engine that runs it.

It keeps what each sample has generated and how much of its text went out. When the engine is lost (EngineLost: a
worker or the whole replica died, or the engine stopped), the request is submitted again with those tokens as
resumed samples. The engine that takes it (the same replica once rebuilt, or another) prefills prompt + tokens and
goes on; a seeded sample's generator skips the draws already made, so the consumer sees the stream it would have
seen without the fault. Each move waits at most `timeout_s` for an engine to take the request. It is given up,
with an EngineError that says so, after `max_migrations` moves, or when a move made no progress since the last
(a request that kills every engine it reaches must not take them all down).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from router.async_engine import EngineBusy, EngineError, EngineLost
from router.request_output import RequestOutput
from router.resumed_sample import ResumedSample
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# submit(resumed, attempt): the request, with its samples' progress; attempt counts every try, so each has its id
Submit = Callable[[tuple[ResumedSample, ...], int], Awaitable[AsyncIterator[RequestOutput]]]


class MigratingStream:
    def __init__(self, submit: Submit, params: SamplingParams, max_migrations: int = 3, timeout_s: float = 60.0):
        self._submit = submit
        self.params = params
        self.max_migrations = max_migrations
        self.timeout_s = timeout_s
        self.stream: AsyncIterator[RequestOutput] | None = None
        self.replica: str | None = None  # where it began
        self.migrations = 0
        self._tries = itertools.count()
        self._tokens_at_move = -1  # tokens generated when it last moved
        self.tokens: dict[int, list[int]] = {}  # sample index -> its tokens so far
        self.text_len: dict[int, int] = {}  # sample index -> characters of text handed out
        self.finished: set[int] = set()
        self.done = False

    @classmethod
    async def open(cls, submit: Submit, params: SamplingParams, **kw) -> "MigratingStream":
        """The request's first submission. A refusal (ValueError, EngineBusy) is raised; an engine lost on the way
        is a move like any other."""
        self = cls(submit, params, **kw)
        try:
            self.stream = await submit((), next(self._tries))
        except EngineLost as e:
            await self._migrate(e)
        self.replica = getattr(self.stream, "replica", None)
        return self

    def __aiter__(self) -> "MigratingStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:  # its last output is out: an engine lost after that changes nothing
            raise StopAsyncIteration
        while True:
            try:
                out = await self.stream.__anext__()
            except EngineLost as e:
                await self._migrate(e)
                continue
            for c in out.outputs:
                self.tokens.setdefault(c.index, []).extend(c.token_ids)
                self.text_len[c.index] = self.text_len.get(c.index, 0) + len(c.text)
                if c.finish_reason is not None:
                    self.finished.add(c.index)
            self.done = out.finished
            return out

    def resumed(self) -> tuple[ResumedSample, ...]:
        """The unfinished samples with their progress; none when nothing was generated (the request starts over)."""
        if not self.finished and not any(self.tokens.values()):
            return ()
        return tuple(ResumedSample(i, self.tokens.get(i, []), self.text_len.get(i, 0))
                     for i in range(self.params.n) if i not in self.finished)

    async def _migrate(self, cause: EngineLost) -> None:
        generated = sum(len(t) for t in self.tokens.values())
        if self.migrations >= self.max_migrations:
            raise EngineError(f"{cause} (the request was moved {self.migrations} times already; given up)") from None
        if generated == self._tokens_at_move:
            raise EngineError(f"{cause} (and again before the request made any progress since its last move; given "
                              "up)") from None
        self.migrations += 1
        self._tokens_at_move = generated
        resumed = self.resumed()
        log.warning("engine lost (%s): moving a request with %d tokens (move %d)", cause, generated, self.migrations)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        delay = 0.05
        while True:
            try:
                left = deadline - loop.time()
                self.stream = await asyncio.wait_for(self._submit(resumed, next(self._tries)), max(left, 0.0))
                return
            except (EngineLost, EngineBusy, asyncio.TimeoutError) as e:  # no engine yet: one rebuilds, or Serve
                if loop.time() + delay > deadline:  # replaces the replica
                    raise EngineError(f"{cause}; no engine took the request back within {self.timeout_s:g} s: "
                                      f"{e or type(e).__name__}") from None
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)
            except Exception as e:  # noqa: BLE001 - what the client gets instead of the rest of its stream
                raise EngineError(f"{cause}; moving the request failed: {e}") from None

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
