"""ApiKeyAuth: ASGI middleware that asks for one of the server's API keys (`Authorization: Bearer <key>`).

Plain ASGI rather than Starlette's `@app.middleware("http")`, which passes every chunk of a streamed response
through a memory stream and a task of its own: per-token work on the hot path of every stream.
"""

from __future__ import annotations

import hmac

from router.body_limit import refuse


class ApiKeyAuth:
    """Requests outside `public_paths` without a right key get 401 in OpenAI's error body."""

    def __init__(self, app, keys: tuple[str, ...], public_paths: tuple[str, ...]):
        self.app, self.keys, self.public_paths = app, keys, public_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in self.public_paths:
            # the first Authorization header: the one Starlette's request.headers gives the session's owner
            given = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
            key = bearer(given.decode("latin-1"))
            if key is None or not key_allowed(key.encode("latin-1"), self.keys):
                return await refuse(send, 401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                    "authentication_error")
        await self.app(scope, receive, send)


def key_allowed(key: bytes, keys: tuple[str, ...]) -> bool:
    """Whether the key given (as sent, in bytes: any byte compares, none raises) is one of the server's."""
    return any(hmac.compare_digest(key, k.encode()) for k in keys)


def bearer(authorization: str) -> str | None:
    """The key of an `Authorization: Bearer <key>` header value."""
    return authorization[len("Bearer "):] if authorization.startswith("Bearer ") else None
