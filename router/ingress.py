"""Ingress: the Ray Serve ingress deployment. OpenAI-compatible HTTP (through Serve's HTTP proxy) and the MoeServe
gRPC service (through Serve's gRPC proxy), over the engine replicas (EngineHandle, routed by LeastWorkRouter).

Both doors share one Frontend and one SessionStore, so a session made over HTTP can be used over gRPC. gRPC
refusals become status codes on Serve's grpc_context.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from router.async_engine import EngineError
from router.engine_handle import EngineHandle
from router.frontend import Frontend
from router.grpc_servicer import GrpcServicer, details, status_code
from router.llm_engine import load_tokenizer
from router.metrics import Metrics
from router.openai_server import ServerLimits, build_app
from router.request_error import RequestError
from router.session_store import SessionStore
from workers.config import ModelConfig
from workers.gc_freeze import freeze_startup_heap


class Ingress:
    def __init__(self, engine, model: str, model_name: str, api_keys: tuple[str, ...] = (),
                 session_ttl_s: float = 1800.0):
        """engine: a DeploymentHandle to the EngineServer deployment; model: the checkpoint directory (for the
        tokenizer, chat template and config)."""
        self.model_name = model_name
        self.limits = ServerLimits(api_keys=tuple(api_keys))
        self.handle = engine
        self.model_dir = Path(model)
        self.session_ttl_s = session_ttl_s

    async def _engine(self) -> EngineHandle:
        """Built on first use: the engine replicas tell us the served context length."""
        if not hasattr(self, "engine"):
            info = await self.handle.info.remote()
            self._serve(EngineHandle(self.handle, load_tokenizer(self.model_dir),
                                     ModelConfig.from_pretrained(self.model_dir), info.max_model_len))
        return self.engine

    def _serve(self, engine) -> None:
        """The doors over the engine (EngineHandle, or an AsyncEngine in this process): one Frontend and one
        SessionStore for both."""
        self.engine = engine
        self.metrics = Metrics(engine, self.model_name)
        self.front = Frontend(engine, self.model_name, SessionStore(self.session_ttl_s), self.metrics.observe)
        self.grpc = GrpcServicer(self.front, self.limits.api_keys)
        freeze_startup_heap()  # a Serve replica (Ingress or EngineIngress), set up now: it serves until it exits

    async def _engine_answers(self) -> None:
        """Raises unless the engine replicas answer (the gRPC health check)."""
        await asyncio.wait_for(self.handle.info.remote(), timeout=5)

    async def __serve_build_asgi_app__(self):
        engine = await self._engine()
        return build_app(engine, self.model_name, self.limits, self.front.sessions, self.metrics)

    # --- gRPC (Serve's proxy calls these by method name) ---

    async def Generate(self, request, grpc_context):
        await self._engine()
        async for response in self._stream(self.grpc.Generate, request, grpc_context):
            yield response

    async def Chat(self, request, grpc_context):
        await self._engine()
        async for response in self._stream(self.grpc.Chat, request, grpc_context):
            yield response

    async def Abort(self, request, grpc_context):
        return await self._unary(self.grpc.Abort, request, grpc_context)

    async def Tokenize(self, request, grpc_context):
        return await self._unary(self.grpc.Tokenize, request, grpc_context)

    async def CreateSession(self, request, grpc_context):
        return await self._unary(self.grpc.CreateSession, request, grpc_context)

    async def DeleteSession(self, request, grpc_context):
        return await self._unary(self.grpc.DeleteSession, request, grpc_context)

    async def Check(self, request, grpc_context):
        """grpc.health.v1: SERVING while the engine answers."""
        from grpc_health.v1 import health_pb2

        from router.grpc_server import SERVICE

        if request.service not in ("", SERVICE):
            refuse(grpc_context, RequestError(404, f"unknown service {request.service!r}"))
            raise RequestError(404, f"unknown service {request.service!r}")
        try:
            await self._engine_answers()
            status = health_pb2.HealthCheckResponse.SERVING
        except Exception:  # noqa: BLE001 - any failure to answer is "not serving"
            status = health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def _unary(self, method, request, context):
        await self._engine()
        try:
            return await method(request, context.invocation_metadata())
        except (RequestError, EngineError) as e:
            refuse(context, e)
            raise

    async def _stream(self, method, request, context):
        try:
            async for response in method(request, context.invocation_metadata()):
                yield response
        except (RequestError, EngineError) as e:
            refuse(context, e)
            raise


def refuse(context, e: Exception) -> None:
    """Sets the status that Serve's proxy returns when the call then raises."""
    import grpc

    if isinstance(e, RequestError):
        context.set_code(status_code(e))
        context.set_details(details(e.message))
    else:
        context.set_code(grpc.StatusCode.INTERNAL)
        context.set_details(details(str(e)))
