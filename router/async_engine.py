"""AsyncEngine: the engine on its own thread, driven from asyncio code (the HTTP and gRPC front doors).

`generate()` validates a request at once (a ValueError says what to fix), then streams its RequestOutputs, one per
step in which it gained tokens, until it finishes. Leaving the stream early (a client that went away) aborts the
request and frees its blocks. If a step fails, every request in flight gets the error on its stream; the engine
thread goes on serving new requests. When a worker died (WorkerError: the executor is gone), the engine is first
rebuilt with `rebuild()`, while new requests wait for it; without `rebuild`, or if that fails, the engine stops
and refuses requests with the cause (`alive` turns False).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from functools import partial

from router.engine_stats import EngineStats
from router.llm_engine import LLMEngine
from router.request_output import RequestOutput
from router.resumed_sample import ResumedSample
from router.worker_stats import WorkerStats
from workers.executor import WorkerError
from workers.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    """A step failed while this request was in flight."""


class EngineLost(EngineError):
    """The engine that ran this request is gone (a worker or the replica died, or the engine stopped); the request
    may go on elsewhere from the tokens it had."""


class EngineBusy(RuntimeError):
    """The engine's queue is full; the request was not taken (HTTP 429, gRPC RESOURCE_EXHAUSTED)."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine | Callable[[], LLMEngine], worker_stats_period_s: float = 5.0,
                 rebuild: Callable[[], LLMEngine] | None = None, replica: str | None = None):
        """engine: the LLMEngine, or a function that builds it. A function is called on the engine's own thread,
        which then runs every step: on CPU a model built on one thread (one OpenMP thread team) and stepped on
        another runs ~40% slower (benchmarks/RESULTS.md). If building fails, this raises what it raised.
        replica: the Serve replica it runs in, named on its streams (the X-Moe-Serve-Replica header)."""
        self._rebuild = rebuild
        self.replica = replica
        self._failure: str | None = None  # why the engine stopped for good
        self.worker_stats_period_s = worker_stats_period_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", id, prompt, params, session) | ("abort", id)
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._wake = threading.Event()
        self._stopped = False
        self._workers: WorkerStats | None = None
        self._workers_read_at = -worker_stats_period_s
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(engine,), name="engine-loop", daemon=True)
        self._thread.start()
        try:
            self._ready.wait()
        except BaseException:  # interrupted: the thread shuts the engine down once built, instead of serving it
            self._stopped = True
            self._wake.set()
            raise
        if self._build_error is not None:
            raise self._build_error

    # what the front doors read
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_config(self):
        return self.engine.model_config

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    async def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                     session_id: str | None = None, resumed: tuple[ResumedSample, ...] = (),
                     sink=None) -> OutputStream:
        """Takes a request, or refuses it now (ValueError: bad input; EngineBusy: the queue is full). Returns its
        output stream, which must be consumed or closed: closing it early aborts the request. `resumed`: its
        samples' tokens from an engine that was lost (LLMEngine.add_request). `sink`: where its outputs go instead
        of the stream's own queue (anything with put_nowait, called on this event loop; then the stream is only
        closed, with `ended=True` once its last output or error went in)."""
        self.engine.validate(prompt_ids, params, resumed)
        if self._stats.waiting >= self.engine.config.max_waiting:
            raise EngineBusy(f"the server is busy ({self._stats.waiting} requests queued); retry shortly")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        stream = asyncio.Queue() if sink is None else sink
        self._streams[request_id] = (asyncio.get_running_loop(), stream)
        if self._failure is not None:  # checked once registered: stopping fails every stream registered by then
            self._streams.pop(request_id, None)
            raise EngineLost(self._failure)
        self._send(("add", request_id, list(prompt_ids), params, session_id, tuple(resumed)))
        return OutputStream(stream, partial(self._forget, request_id), self.replica)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None,
                       session_id: str | None = None,
                       resumed: tuple[ResumedSample, ...] = ()) -> AsyncIterator[RequestOutput]:
        """submit() and its stream in one: the refusal comes at the first iteration."""
        outputs = await self.submit(prompt_ids, params, request_id, session_id, resumed)
        try:
            async for out in outputs:
                yield out
        finally:
            outputs.close()

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    async def end_session(self, session_id: str) -> None:
        """Lets go of the session's pinned history on this engine."""
        self._send(("end_session", session_id))

    def stats(self) -> EngineStats:
        """As of the last step."""
        return self._stats

    def worker_stats(self) -> dict[str, WorkerStats]:
        """Per expert and per worker, as last read; keyed by replica (one, "local")."""
        return {} if self._workers is None else {"local": self._workers}

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.shutdown()

    def _forget(self, request_id: str, ended: bool) -> None:
        """A stream closed: its request is aborted unless it ended."""
        self._streams.pop(request_id, None)
        if not ended:
            self.abort(request_id)

    def _send(self, message: tuple) -> None:
        self._inbox.put(message)
        self._wake.set()

    # --- the engine thread ---

    def _run(self, engine: LLMEngine | Callable[[], LLMEngine]) -> None:
        try:
            self.engine = engine if isinstance(engine, LLMEngine) else engine()
        except BaseException as e:  # noqa: BLE001 - raised by __init__, on the caller's thread
            self._build_error = e
            self._ready.set()
            return
        try:
            self._stats = self.engine.stats()
        except BaseException as e:  # noqa: BLE001 - as above; stopped, the loop below shuts the engine built down
            self._build_error = e
            self._stopped = True
        finally:
            self._ready.set()
        try:
            while not self._stopped:
                self._wake.clear()
                self._take_messages()
                if not self.engine.has_unfinished():
                    self._wake.wait()
                    continue
                try:
                    outputs = self.engine.step()
                except WorkerError as e:
                    self._lose_workers(e)
                    continue
                except Exception as e:  # noqa: BLE001 - reported to every request in flight
                    log.exception("engine step failed")
                    self._fail_all(EngineError(f"the engine failed while running this request: {e}"))
                    self._refresh_stats()
                    continue
                self._refresh_stats()  # before the outputs: a client that saw its request end sees it gone
                self._emit_all([(out.request_id, out) for out in outputs])
                self._read_workers()
        finally:
            self.engine.shutdown()  # also an engine rebuilt while shutdown() waited

    def _refresh_stats(self) -> None:
        self._stats = self.engine.stats()._replace(workers=self._workers)

    def _read_workers(self) -> None:
        """The workers' stats, read again every worker_stats_period_s (a report round with every worker)."""
        now = time.monotonic()
        if now < self._workers_read_at + self.worker_stats_period_s:
            return
        self._workers_read_at = now
        try:
            self._workers = self.engine.worker_stats(self._workers)
            self._refresh_stats()
        except WorkerError as e:
            self._lose_workers(e)
        except Exception:  # noqa: BLE001 - only the metrics miss a reading
            log.exception("reading the workers' stats failed")

    def _lose_workers(self, cause: WorkerError) -> None:
        """A worker died: the requests in flight get the error, and the engine is built anew."""
        log.error("engine workers failed: %s", cause)
        self._fail_all(EngineLost(f"the engine failed while running this request: {cause}"))
        self._replace_engine(cause)
        self._refresh_stats()

    def _replace_engine(self, cause: Exception) -> None:
        """A new engine for the one whose workers failed; the requests sent meanwhile wait in the inbox. With no
        way to build one, or if building fails, the engine stops, and every request waiting gets the cause."""
        self.engine.shutdown()
        self._workers = None
        if self._rebuild is not None:
            t0 = time.monotonic()
            try:
                self.engine = self._rebuild()
                log.warning("engine rebuilt in %.1f s after: %s", time.monotonic() - t0, cause)
                return
            except Exception as e:  # noqa: BLE001 - the engine stops with it
                log.exception("rebuilding the engine failed")
                cause = e
        self._stopped = True
        self._failure = f"the engine stopped: {cause}"
        for request_id in list(self._streams):
            self._emit(request_id, EngineLost(self._failure))

    def _take_messages(self) -> None:
        took = False
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                break
            took = True
            if message[0] == "add":
                _, request_id, prompt_ids, params, session_id, resumed = message
                try:
                    self.engine.add_request(prompt_ids, params, request_id, session_id, resumed)
                except ValueError as e:
                    self._emit(request_id, e)
            elif message[0] == "end_session":
                self.engine.end_session(message[1])
            else:
                out = self.engine.abort(message[1])
                if out is not None:
                    self._emit(message[1], out)
        if took:  # (after a step, the stats are fresh already)
            self._refresh_stats()

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
            self._emit(request_id, error)

    def _emit(self, request_id: str, item) -> None:
        self._emit_all([(request_id, item)])

    def _emit_all(self, items: list[tuple[str, object]]) -> None:
        """(request id, output or error) pairs to their streams, handed to each event loop in one call: one
        wake-up per loop and step, not one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for request_id, item in items:
            target = self._streams.get(request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(deliver, batch)
            except RuntimeError:  # that client's event loop is gone
                pass


def deliver(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for stream, item in batch:
        stream.put_nowait(item)


class OutputStream:
    """One request's outputs as they come. Leaving before the end (close(), or a cancelled wait) aborts it.
    Outputs that piled up while the reader was busy come as one, their deltas merged (as vLLM's output collector
    does): a reader that keeps up gets every step's, one that lags is not left further behind by a message each.
    `on_close(ended)` is called once, when the stream closes: ended is True when its last output or error was out."""

    def __init__(self, queue: asyncio.Queue, on_close: Callable[[bool], None], replica: str | None = None):
        self._queue, self._on_close = queue, on_close
        self.replica = replica  # where it runs, when that is a Serve replica
        self._open = True
        self._finished = False
        self._error: Exception | None = None  # came behind outputs merged into the last one; raised next

    def __aiter__(self) -> "OutputStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished or not self._open:
            raise StopAsyncIteration
        try:
            item = self._error or await self._queue.get()
        except BaseException:
            self.close()
            raise
        while isinstance(item, RequestOutput) and not item.finished and not self._queue.empty():
            later = self._queue.get_nowait()
            if isinstance(later, Exception):
                self._error = later
                break
            item = item.merge(later)
        if isinstance(item, Exception):
            self._finished = True
            self.close()
            raise item
        if item.finished:
            self._finished = True
            self.close()
        return item

    async def aclose(self) -> None:
        self.close()

    def close(self, ended: bool = False) -> None:
        """ended: the request's last output or error went elsewhere (a sink): nothing to abort."""
        self._finished = self._finished or ended
        if self._open:
            self._open = False
            self._on_close(self._finished)
