"""SessionStore: the router's sessions, each a conversation's exact token history, bound to the key that made it.

A session request sends the whole conversation, as OpenAI clients do. Its rendered text (the chat template's
output, or the completion prompt) is matched against the text the session has seen: where it continues it, the
session's own tokens stand for that part and only the rest is tokenized, so the model sees exactly what it saw
before (a reply is never re-tokenized differently) and the engine's pinned prefix serves it from cache. A text that
does not continue the session starts its history over.

The router keeps the history, not the engine, so a session whose engine died continues on another one (its next
turn recomputes the history there). Sessions idle for `ttl_s`, or the least recently used beyond `max_sessions`,
expire; using one then is a clear "session expired" error.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field


class SessionError(LookupError):
    def __init__(self, message: str, expired: bool):
        super().__init__(message)
        self.expired = expired


@dataclass(eq=False)
class Session:
    session_id: str
    owner: str  # a digest of the API key that made it ("" when the server has no keys)
    ttl_s: float
    last_used: float
    text: str = ""  # the conversation so far, as rendered
    token_ids: list[int] = field(default_factory=list)  # what the model saw for it
    busy: bool = False  # a turn is running (a session takes one turn at a time)

    def prompt_for(self, text: str, encode_rest: Callable[[str], list[int]],
                   encode_all: Callable[[str], list[int]]) -> list[int]:
        """The token ids for a turn whose rendered conversation is `text`."""
        if self.text and text.startswith(self.text):
            return self.token_ids + encode_rest(text[len(self.text):])
        return encode_all(text)

    def record(self, text: str, token_ids: list[int]) -> None:
        """After a finished turn: the conversation as it will be rendered next time, and the tokens behind it."""
        self.text, self.token_ids = text, list(token_ids)


class SessionStore:
    def __init__(self, ttl_s: float = 1800.0, max_sessions: int = 10_000, clock=time.monotonic):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.clock = clock
        self.sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self.expired: OrderedDict[str, None] = OrderedDict()  # recently expired ids, to say so

    def create(self, api_key: str | None, ttl_s: float | None = None) -> Session:
        self.evict()
        session_id = "sess-" + secrets.token_urlsafe(24)  # unguessable
        session = Session(session_id, owner_of(api_key), self.ttl_s if ttl_s is None else ttl_s, self.clock())
        self.sessions[session_id] = session
        while len(self.sessions) > self.max_sessions:
            self._expire(next(iter(self.sessions)))
        return session

    def get(self, session_id: str, api_key: str | None) -> Session:
        """The caller's session, marked used; SessionError if it is unknown, another key's, or expired."""
        self.evict()
        session = self.sessions.get(session_id)
        if session is None or not secrets.compare_digest(session.owner, owner_of(api_key)):
            if session_id in self.expired:
                raise SessionError(f"session {session_id} expired; create a new one with POST /v1/sessions", True)
            raise SessionError(f"no session {session_id}; create one with POST /v1/sessions", False)
        session.last_used = self.clock()
        self.sessions.move_to_end(session_id)
        return session

    def delete(self, session_id: str, api_key: str | None) -> Session:
        session = self.get(session_id, api_key)
        del self.sessions[session_id]
        return session

    def evict(self) -> list[str]:
        """Expires sessions idle past their TTL; their ids."""
        now = self.clock()
        gone = [s.session_id for s in self.sessions.values() if not s.busy and now - s.last_used > s.ttl_s]
        for session_id in gone:
            self._expire(session_id)
        return gone

    def _expire(self, session_id: str) -> None:
        del self.sessions[session_id]
        self.expired[session_id] = None
        while len(self.expired) > self.max_sessions:
            self.expired.popitem(last=False)


def owner_of(api_key: str | None) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else ""
