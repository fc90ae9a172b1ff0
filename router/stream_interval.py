"""StreamInterval: streams each request's outputs every `interval` steps instead of every step.

A request's first output (its first token) and its last go out at once; in between, its deltas are merged and held
until `interval` steps have added to them. Fewer, larger messages: less per-token work on every hop between the
engine and the client (Ray, the router, HTTP), at the price of burstier streams. As vLLM's `--stream-interval`.
"""

from __future__ import annotations

from router.request_output import RequestOutput


class StreamInterval:
    def __init__(self, interval: int = 1):
        if interval < 1:
            raise ValueError(f"stream_interval must be at least 1, not {interval}")
        self.interval = interval
        self._held: dict[str, tuple[RequestOutput, int]] = {}  # request -> (merged deltas held, steps in them)
        self._started: set[str] = set()  # requests that have streamed their first output

    def __call__(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """This step's outputs -> those to stream now."""
        if self.interval == 1:
            return outputs
        ready = []
        for out in outputs:
            held, steps = self._held.pop(out.request_id, (None, 0))
            out = out if held is None else held.merge(out)
            if out.finished:
                self._started.discard(out.request_id)
                ready.append(out)
            elif out.request_id not in self._started or steps + 1 >= self.interval:
                self._started.add(out.request_id)
                ready.append(out)
            else:
                self._held[out.request_id] = (out, steps + 1)
        return ready

    def drop(self, request_id: str) -> None:
        """Forgets a request that ended without a last output here (aborted)."""
        self._held.pop(request_id, None)
        self._started.discard(request_id)
