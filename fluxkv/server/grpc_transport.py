"""The gRPC transport: serves the handlers' plain async functions (and, for
server-streaming methods, functions returning async generators), the standard
health service and server reflection, on one of two servers with grpcio's
asyncio API: pygrpc-native (HTTP/2 and gRPC framing in Rust, outside the GIL;
reflection's bidirectional stream goes to a grpc.aio server it runs behind
itself) or grpc.aio.

Request and response types come from the services' descriptors; a
KVError ends its call with its kind's status code and message and, when it
has an ErrorInfo, the structured details (fluxkv/rpc/status.py). Each call is
counted in its method's MethodStats (fluxkv/obs/metrics.py) as it ends and, with
tracing on, is a SERVER span (fluxkv/obs/tracing.py).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from bisect import bisect_left
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from time import perf_counter
from typing import Any, cast

import grpc
import pygrpc_native
import pygrpc_native.aio
import uvloop
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from fluxkv.core.errors import KVError
from fluxkv.obs.metrics import LATENCY_BOUNDS, MethodStats, RequestMetrics
from fluxkv.obs.tracing import Tracing
from fluxkv.rpc import call_context
from fluxkv.rpc import status as rpc_status
from fluxkv.rpc.spans import rpc_attributes

log = logging.getLogger("fluxkv.grpc")

UnaryHandler = Callable[[Any], Awaitable[Any]]
# Checks the request and sets the stream up when called, before any iteration:
# the transport sends the call's headers as soon as it returns.
StreamHandler = Callable[[Any], AsyncGenerator[Any, None]]
Handler = UnaryHandler | StreamHandler
# Checks a call's metadata; raises KVError to refuse it.
Authorize = Callable[[Sequence[tuple[str, str | bytes]] | None], None]

METADATA_LIMIT_BYTES = 16 * 1024
SERVERS = {"native": pygrpc_native.aio.server, "grpcio": grpc.aio.server}
VERSIONS = {"native": f"pygrpc-native {pygrpc_native.__version__}", "grpcio": f"grpcio {grpc.__version__}"}
EVENT_LOOPS = ("auto", "asyncio", "uvloop")


def loop_factory(event_loop: str, server: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop to serve on (None: asyncio's). `auto` is uvloop's under grpcio, where
    bench/transport.py found it cuts the server CPU per call by a sixth, and asyncio's under
    pygrpc-native, whose HTTP/2 work is off the loop and where it made no measurable difference."""
    if event_loop == "uvloop" or (event_loop == "auto" and server == "grpcio"):
        return uvloop.new_event_loop
    return None


class GrpcTransport:
    """One gRPC server (`server`: a key of SERVERS) for a set of services:
    {"pkg.Service": {"Method": handler}}. With `authorize`, reflection answers
    only calls whose metadata it accepts (it raises KVError otherwise); the
    health service stays open."""

    def __init__(
        self,
        services: Mapping[str, Mapping[str, Handler]],
        max_message_bytes: int,
        metrics: RequestMetrics,
        tracing: Tracing | None = None,
        server: str = "native",
        credentials: grpc.ServerCredentials | None = None,
        authorize: Authorize | None = None,
    ) -> None:
        if credentials is not None and server != "grpcio":
            raise ValueError("only grpcio serves TLS: pygrpc-native has none")
        self.server = server
        self._credentials = credentials
        self.version = VERSIONS[server]
        self._server = SERVERS[server](
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                # Fail to bind a port another process holds instead of sharing it.
                ("grpc.so_reuseport", 0),
                # One limit on a call's metadata for both servers: grpcio would also refuse
                # some calls at random between its soft limit (8 KiB) and this.
                ("grpc.max_metadata_size", METADATA_LIMIT_BYTES),
                ("grpc.absolute_max_metadata_size", METADATA_LIMIT_BYTES),
            ]
        )
        for name, methods in services.items():
            handlers = _method_handlers(name, methods, metrics, tracing)
            self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
            # Registered methods skip grpcio's generic lookup on every call.
            self._server.add_registered_method_handlers(name, handlers)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._service_names = tuple(services)
        reflected = (*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME)
        if authorize is None:
            reflection.enable_server_reflection(reflected, self._server)
        else:
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
                _GuardedReflection(reflected, authorize), self._server
            )

    def bind(self, host: str, port: int) -> int:
        """Listen on host:port (over TLS with the transport's credentials); return the bound port.
        Raises OSError if it cannot."""
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            if self._credentials is None:
                bound: int = self._server.add_insecure_port(target)
            else:
                bound = self._server.add_secure_port(target, self._credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {target}: {exc}") from None
        if bound == 0:
            raise OSError(f"cannot listen on {target}")
        return bound

    async def start(self) -> None:
        await self._server.start()
        for name in ("", *self._service_names):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def not_serving(self) -> None:
        """Report NOT_SERVING to health checks from now on: the first step of shutdown."""
        await self._health.enter_graceful_shutdown()

    async def stop(self, grace_s: float) -> None:
        """Report NOT_SERVING, refuse new calls, give in-flight calls grace_s to finish."""
        await self.not_serving()
        await self._server.stop(grace_s)


class _GuardedReflection(reflection.aio.ReflectionServicer):  # type: ignore[misc]
    """Server reflection behind `authorize`. Its bidirectional stream is served by grpc.aio on
    both servers (pygrpc-native hands it to the grpc.aio server behind it), so the check sits
    in the servicer itself rather than in an interceptor, which pygrpc-native would run on
    every call of every method."""

    def __init__(self, service_names: Sequence[str], authorize: Authorize) -> None:
        super().__init__(service_names)
        self._authorize = authorize

    async def ServerReflectionInfo(
        self, request_iterator: Any, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[Any, None]:
        try:
            self._authorize(context.invocation_metadata())
        except KVError as exc:
            await context.abort(rpc_status.status_code(exc.kind), exc.message)
        async for response in super().ServerReflectionInfo(request_iterator, context):
            yield response


def _method_handlers(
    service: str, methods: Mapping[str, Handler], metrics: RequestMetrics, tracing: Tracing | None
) -> dict[str, grpc.RpcMethodHandler]:
    descriptor = descriptor_pool.Default().FindServiceByName(service)
    declared = set(descriptor.methods_by_name)
    if declared != set(methods):
        raise ValueError(f"{service}: handlers for {sorted(methods)} but the proto declares {sorted(declared)}")
    handlers = {}
    for name, fn in methods.items():
        method = descriptor.methods_by_name[name]
        path = f"{service}/{name}"
        if method.client_streaming:
            raise ValueError(f"{path}: client-streaming methods are not supported")
        if method.server_streaming == inspect.iscoroutinefunction(fn):
            needed = "a function returning an async generator" if method.server_streaming else "an async function"
            raise ValueError(f"{path}: the proto's method needs {needed} as its handler")
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        stats = metrics.method(path, method.server_streaming)
        if method.server_streaming:
            handlers[name] = grpc.unary_stream_rpc_method_handler(
                _stream(path, cast(StreamHandler, fn), stats, tracing),
                request_deserializer=_parser(request),
                response_serializer=response.SerializeToString,
            )
        else:
            handlers[name] = grpc.unary_unary_rpc_method_handler(
                _unary(path, cast(UnaryHandler, fn), stats, tracing),
                request_deserializer=_parser(request),
                response_serializer=response.SerializeToString,
            )
    return handlers


class _Malformed:
    """A request that did not parse: answered INVALID_ARGUMENT, not grpcio's UNKNOWN."""

    def __init__(self, message: str) -> None:
        self.message = message


def _parser(request: type[Message]) -> Callable[[bytes], Message | _Malformed]:
    name = request.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | _Malformed:
        try:
            return request.FromString(data)
        except DecodeError as exc:
            return _Malformed(f"the request is not a valid {name}: {exc}")

    return parse


def _unary(
    path: str, fn: UnaryHandler, stats: MethodStats, tracing: Tracing | None
) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    buckets = stats.buckets
    attributes = rpc_attributes(path)

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        start = perf_counter()
        # The handler runs in the span's context: a write's sink (WriteLinks) and
        # a forwarded call see it.
        span = (
            None
            if tracing is None
            else tracing.server_span(path, attributes, context.invocation_metadata(), current=True)
        )
        status = _OK
        try:
            if type(request) is _Malformed:
                status = grpc.StatusCode.INVALID_ARGUMENT
                await context.abort(status, request.message)
            call_context.current.set(context)
            try:
                return await fn(request)
            except Exception as exc:
                status, message, trailing = _status_of(path, exc)
                await context.abort(status, message, trailing)
        except asyncio.CancelledError:  # the caller went away, or its deadline passed
            status = grpc.StatusCode.CANCELLED
            raise
        finally:
            elapsed = perf_counter() - start
            buckets[bisect_left(LATENCY_BOUNDS, elapsed)] += 1
            stats.sum += elapsed
            if status is not _OK:
                stats.failed(status.name)
            if span is not None:
                span.end(status)

    return call


def _stream(
    path: str, fn: StreamHandler, stats: MethodStats, tracing: Tracing | None
) -> Callable[[Any, grpc.aio.ServicerContext], AsyncGenerator[Any, None]]:
    attributes = rpc_attributes(path)

    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncGenerator[Any, None]:
        # Not the current span: a generator may be closed from another context.
        span = (
            None
            if tracing is None
            else tracing.server_span(path, attributes, context.invocation_metadata(), current=False)
        )
        status = _OK
        try:
            if type(request) is _Malformed:
                status = grpc.StatusCode.INVALID_ARGUMENT
                await context.abort(status, request.message)
            call_context.current.set(context)
            try:
                async with aclosing(fn(request)) as responses:
                    # The handler accepted the request and set the stream up: say so.
                    await context.send_initial_metadata(())
                    async for response in responses:
                        yield response
            except Exception as exc:
                status, message, trailing = _status_of(path, exc)
                await context.abort(status, message, trailing)
        except (asyncio.CancelledError, GeneratorExit):  # the caller went away
            status = grpc.StatusCode.CANCELLED
            raise
        finally:
            stats.streams += 1
            if status is not _OK:
                stats.failed(status.name)
            if span is not None:
                span.end(status)

    return call


_OK = grpc.StatusCode.OK


def _status_of(path: str, exc: Exception) -> tuple[grpc.StatusCode, str, tuple[tuple[str, bytes], ...]]:
    """The status, message and trailing metadata that end a call whose handler
    raised `exc`: KVError's kind and details, else INTERNAL (logged)."""
    if isinstance(exc, KVError):
        status = rpc_status.status_code(exc.kind)
        if exc.info is None:
            return status, exc.message, ()
        return status, exc.message, rpc_status.details_metadata(status, exc.message, exc.info)
    log.exception("unexpected error in %s", path, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error in {path}: {type(exc).__name__}", ()
