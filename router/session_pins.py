"""SessionPins: each session's history held in the prefix cache between its turns.

When a session's turn finishes, its computed full blocks are pinned (a reference is kept on them), so the next turn
finds them however busy the cache gets meanwhile, and prefills only its new tokens. A session's pins live on the
attention rank that computed them, and its next turn goes there. Pins are dropped when the session ends, after
`ttl_s` without a turn, or, least recently used first, when a rank's pins would exceed `max_fraction` of its blocks
or when the rank cannot go on without their blocks (`evict`); a dropped session still works, it just recomputes what
the cache no longer holds.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import NamedTuple

from workers.block_manager import BlockManager


class Pin(NamedTuple):
    rank: int
    blocks: list[int]
    last_used: float


class SessionPins:
    def __init__(self, managers: list[BlockManager], max_fraction: float, ttl_s: float, clock=time.monotonic):
        self.managers = managers  # one per attention rank
        self.max_blocks = [int(m.num_blocks * max_fraction) for m in managers]
        self.ttl_s = ttl_s
        self.clock = clock
        self.pins: OrderedDict[str, Pin] = OrderedDict()  # least recently used first

    def rank_of(self, session_id: str) -> int | None:
        pin = self.pins.get(session_id)
        return None if pin is None else pin.rank

    def hold(self, session_id: str, rank: int, hashes: list[int]) -> None:
        """Pins the cached blocks of this hash chain for the session, in place of what it held before."""
        blocks = self.managers[rank].pin(hashes)  # referenced first, so blocks shared with the old pin stay put
        self.drop(session_id)
        self.pins[session_id] = Pin(rank, blocks, self.clock())
        self._fit(rank)

    def drop(self, session_id: str) -> None:
        pin = self.pins.pop(session_id, None)
        if pin is not None:
            self.managers[pin.rank].release(list(pin.blocks))

    def expire(self) -> None:
        """Drops the pins of sessions idle for longer than the TTL."""
        deadline = self.clock() - self.ttl_s
        while self.pins:
            session_id, pin = next(iter(self.pins.items()))
            if pin.last_used > deadline:
                return
            self.drop(session_id)

    def evict(self, rank: int) -> bool:
        """Drops the least recently used pin on this rank; False if it has none."""
        session_id = next((s for s, p in self.pins.items() if p.rank == rank), None)
        if session_id is None:
            return False
        self.drop(session_id)
        return True

    def pinned_blocks(self, rank: int) -> int:
        return sum(len(p.blocks) for p in self.pins.values() if p.rank == rank)

    def _fit(self, rank: int) -> None:
        """Least recently used sessions on this rank lose their pins until the rank is within its cap."""
        over = self.pinned_blocks(rank) - self.max_blocks[rank]
        for session_id in [s for s, p in self.pins.items() if p.rank == rank]:
            if over <= 0:
                return
            over -= len(self.pins[session_id].blocks)
            self.drop(session_id)
