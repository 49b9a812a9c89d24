"""OpenTelemetry spans of gRPC calls, on OpenTelemetry's API alone (the client
SDK uses it without the node's tracing SDK): the attributes of OpenTelemetry's
gRPC conventions, reading a caller's context from call metadata, and CLIENT
spans that send their context to the callee as W3C `traceparent` metadata.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cache
from types import MappingProxyType

import grpc
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

Metadata = Sequence[tuple[str, str | bytes]]


class _MetadataGetter(Getter[Metadata]):
    """Reads a propagator's fields from gRPC metadata ((key, value) pairs)."""

    def get(self, carrier: Metadata, key: str) -> list[str] | None:
        found = [v if isinstance(v, str) else v.decode("latin-1") for k, v in carrier if k == key]
        return found or None

    def keys(self, carrier: Metadata) -> list[str]:
        return [k for k, _ in carrier]


METADATA = _MetadataGetter()


@cache
def rpc_attributes(path: str) -> Mapping[str, str]:
    """A gRPC span's attributes for method path "package.Service/Method" (one read-only mapping per path)."""
    service, _, method = path.partition("/")
    return MappingProxyType({"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})


@contextmanager
def client_span(tracer: trace.Tracer, path: str, peer: str) -> Iterator[tuple[Span, list[tuple[str, str]] | None]]:
    """A CLIENT span around an outgoing call of `path` to `peer`: yields the
    span and the metadata that carries its context to the callee (None when
    this process traces nothing, which costs one no-op span)."""
    span = tracer.start_span(path, kind=SpanKind.CLIENT, attributes=rpc_attributes(path))
    if not span.get_span_context().is_valid:
        yield span, None
        return
    if span.is_recording():
        host, _, port = peer.rpartition(":")
        span.set_attribute("server.address", host.strip("[]"))
        if port.isdigit():
            span.set_attribute("server.port", int(port))
    with trace.use_span(span, end_on_exit=True):
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        yield span, list(carrier.items())


def client_failed(span: Span, code: grpc.StatusCode) -> None:
    """Mark a CLIENT span's call as failed with `code` (any non-OK status is an error)."""
    if span.is_recording():
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_status(Status(StatusCode.ERROR, code.name))
