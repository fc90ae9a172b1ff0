"""OutputChannel: on an engine replica, the outputs of one Ingress replica's requests, sent to it as one batch per
step over one stream (EngineServer.outputs) instead of a Ray stream item per request per token.

The engine puts each request's outputs and errors in through a ChannelSink, in order; the reader takes whatever
came since it last took. Outputs wait here until a reader comes (one may come after its requests' first outputs).
"""

from __future__ import annotations

import asyncio
import time


class OutputChannel:
    def __init__(self):
        self.batch: list[tuple[str, int, object]] = []  # (request id, its n-th item, RequestOutput or the
        # exception that ended it)
        self.requests = 0  # its requests in flight on this replica
        self.readers = 0  # attached and not yet gone
        self.reader = 0  # the one that takes: the latest to attach
        self.idle_since = time.monotonic()  # when it was made, or its last request or reader left
        self._ready = asyncio.Event()

    def put(self, request_id: str, seq: int, item) -> None:
        self.batch.append((request_id, seq, item))
        self._ready.set()

    def begin(self) -> None:
        """A request of this channel is in flight."""
        self.requests += 1

    def end(self) -> None:
        """It is no longer; a reader waiting may go once none is left."""
        self.requests -= 1
        self.idle_since = time.monotonic()
        self._ready.set()

    def attach(self) -> int:
        """A reader comes; it takes from now on, and one before it takes nothing more (the Ingress gave up on it:
        what it took then would be lost)."""
        self.readers += 1
        self.reader += 1
        self._ready.set()
        return self.reader

    def detach(self) -> None:
        """A reader went."""
        self.readers -= 1
        self.idle_since = time.monotonic()

    async def take(self, reader: int, linger_s: float) -> list[tuple[str, int, object]] | None:
        """What came since the last take, once something has; None once no request has been in flight for linger_s
        and nothing is left: the reader then goes, as an open stream counts as an ongoing request on the replica
        (for autoscaling, and to drain it). None at once for a reader that another came after."""
        while not self.batch and reader == self.reader:
            self._ready.clear()
            try:
                await asyncio.wait_for(self._ready.wait(), None if self.requests else linger_s)
            except asyncio.TimeoutError:
                if self.requests == 0 and not self.batch:
                    return None
        if reader != self.reader:
            return None
        batch, self.batch = self.batch, []
        return batch

    @property
    def unused(self) -> bool:
        """No request in flight and no reader: what is left in it has no one to go to once the Ingress is gone."""
        return self.requests == 0 and self.readers == 0


class ChannelSink:
    """One request's way into a channel (AsyncEngine.submit's sink); `ended` is set once its last output or the
    error that ended it went in (a wait on it that is cancelled leaves it unset: that is no end)."""

    def __init__(self, channel: OutputChannel, request_id: str):
        self.channel, self.request_id = channel, request_id
        self.ended = asyncio.Event()
        self.sent = 0

    def put_nowait(self, item) -> None:
        self.channel.put(self.request_id, self.sent, item)
        self.sent += 1
        if isinstance(item, Exception) or item.finished:
            self.ended.set()
