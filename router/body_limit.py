"""Request size limits as ASGI middleware: BodyLimit refuses bodies over a size with 413, whether declared or
streamed; HeaderLimit refuses too many or too large headers with 431. Both answer in OpenAI's error body and leave
the server serving. (uvicorn's default parser, httptools, which Ray Serve's proxy uses too, sets no header limit.)"""

from __future__ import annotations

import json

from router.request_error import error_body


class BodyLimit:
    """ASGI middleware: a request body over max_bytes gets 413, declared (Content-Length) or streamed. A streamed
    one is refused here as soon as it passes the limit, and the app is told the client left (raising instead would
    reach FastAPI's body parsing, which turns any error into a 400)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await refuse(send, 413, f"the request body is over {self.max_bytes} bytes")
        seen, started, refused = 0, False, False

        async def counted():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                refused = True
                if not started:
                    await refuse(send, 413, f"the request body is over {self.max_bytes} bytes")
                return {"type": "http.disconnect"}
            return message

        async def answer(message):
            nonlocal started
            if not refused:  # after a 413, what the app says to the "gone" client goes nowhere
                started = True
                await send(message)

        await self.app(scope, counted, answer)


class HeaderLimit:
    """ASGI middleware: a request with more than max_count header lines, or more than max_bytes of them (names and
    values together), gets 431 before it reaches the app."""

    def __init__(self, app, max_bytes: int, max_count: int):
        self.app, self.max_bytes, self.max_count = app, max_bytes, max_count

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            headers = scope.get("headers", ())
            if len(headers) > self.max_count:
                return await refuse(send, 431, f"the request has {len(headers)} headers; at most {self.max_count}")
            size = sum(len(name) + len(value) for name, value in headers)
            if size > self.max_bytes:
                return await refuse(send, 431, f"the request headers are over {self.max_bytes} bytes")
        return await self.app(scope, receive, send)


async def refuse(send, status: int, message: str, kind: str = "invalid_request_error") -> None:
    body = json.dumps(error_body(message, kind, status)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
