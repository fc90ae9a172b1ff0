"""serve_grpc: a grpc.aio server for the MoeServe service, with the standard grpc.health.v1 service and server
reflection beside it. GrpcServicer's refusals (RequestError) and engine failures become gRPC status codes here,
and so does a request body that does not parse (INVALID_ARGUMENT, where grpc itself would answer UNKNOWN).
"""

from __future__ import annotations

from typing import NamedTuple

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from proto import moe_serve_pb2 as pb
from proto import moe_serve_pb2_grpc as pb_grpc
from router.async_engine import EngineError
from router.grpc_servicer import GrpcServicer, details, status_code
from router.request_error import RequestError

SERVICE = pb.DESCRIPTOR.services_by_name["MoeServe"].full_name  # moe_serve.v1.MoeServe


class Unparsed(NamedTuple):
    """A request body that is not a valid request message: what the method gets in its place, to refuse."""
    message: str


def parser(message_cls):
    """The request deserializer. A DecodeError raised from grpc's own would reach the client as UNKNOWN
    "Unexpected <class 'DecodeError'>"; a body that does not parse is the client's error."""
    def parse(body: bytes):
        try:
            return message_cls.FromString(body)
        except DecodeError as e:
            return Unparsed(f"the request body is not a {message_cls.DESCRIPTOR.full_name} message ({e}); check "
                            "that the client's proto matches proto/moe_serve.proto")
    return parse


class AioMoeServe(pb_grpc.MoeServeServicer):
    """GrpcServicer behind grpc.aio: metadata in, status codes out."""

    def __init__(self, servicer: GrpcServicer):
        self.servicer = servicer

    async def _unary(self, method, request, context):
        if isinstance(request, Unparsed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            return await method(request, context.invocation_metadata())
        except RequestError as e:
            await context.abort(status_code(e), details(e.message))
        except EngineError as e:
            await context.abort(grpc.StatusCode.INTERNAL, details(str(e)))

    async def _stream(self, method, request, context):
        if isinstance(request, Unparsed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            async for response in method(request, context.invocation_metadata()):
                yield response
        except RequestError as e:
            await context.abort(status_code(e), details(e.message))
        except EngineError as e:
            await context.abort(grpc.StatusCode.INTERNAL, details(str(e)))

    async def Generate(self, request, context):
        async for response in self._stream(self.servicer.Generate, request, context):
            yield response

    async def Chat(self, request, context):
        async for response in self._stream(self.servicer.Chat, request, context):
            yield response

    async def Abort(self, request, context):
        return await self._unary(self.servicer.Abort, request, context)

    async def Tokenize(self, request, context):
        return await self._unary(self.servicer.Tokenize, request, context)

    async def CreateSession(self, request, context):
        return await self._unary(self.servicer.CreateSession, request, context)

    async def DeleteSession(self, request, context):
        return await self._unary(self.servicer.DeleteSession, request, context)


def add_moe_serve(servicer: AioMoeServe, server: grpc.aio.Server) -> None:
    """As the generated add_MoeServeServicer_to_server, with each request read by parser()."""
    handlers = {}
    for m in pb.DESCRIPTOR.services_by_name["MoeServe"].methods:
        assert not m.client_streaming, m.full_name
        handler = grpc.unary_stream_rpc_method_handler if m.server_streaming else grpc.unary_unary_rpc_method_handler
        handlers[m.name] = handler(getattr(servicer, m.name),
                                   request_deserializer=parser(GetMessageClass(m.input_type)),
                                   response_serializer=GetMessageClass(m.output_type).SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


async def serve_grpc(servicer: GrpcServicer, host: str = "127.0.0.1", port: int = 0) -> tuple[grpc.aio.Server, int]:
    """Starts the server (MoeServe, grpc.health.v1, reflection); returns it and the port it listens on."""
    server = grpc.aio.server()
    add_moe_serve(AioMoeServe(servicer), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound
