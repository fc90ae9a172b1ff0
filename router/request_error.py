"""RequestError: a refused request, with the HTTP status and OpenAI's error body; every refusal says what to fix.
The gRPC door maps the status to a gRPC code."""

from __future__ import annotations


class RequestError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def __reduce__(self):  # it crosses processes (Ray Serve replicas)
        return type(self), (self.status, self.message, self.kind, self.param)


def error_body(message: str, kind: str, status: int, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
