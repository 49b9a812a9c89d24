"""Errors on the wire, for the node's transport, its forwarding and the client SDK.

A kind's status code is grpc's StatusCode of the number fluxkv/core/errors.py gives
it. A failure's ErrorInfo travels as gRPC's richer error model has it, which
every language's gRPC status package reads (grpcio-status's `rpc_status`, Go's
`status.FromError(err).Details()`, Java's `StatusProto.fromThrowable`): a
google.rpc.Status (the call's code and message, and the details) serialized in
the trailing metadata `grpc-status-details-bin`, one of its details a
google.rpc.ErrorInfo of the domain errors.DOMAIN.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from fluxkv.core.errors import DOMAIN, ErrorInfo, ErrorKind, kind_of

DETAILS_KEY = "grpc-status-details-bin"

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}

Metadata = Iterable[tuple[str, str | bytes]]


def status_code(kind: ErrorKind) -> grpc.StatusCode:
    return _STATUS_CODES[kind.value]


def kind_of_status(code: grpc.StatusCode) -> ErrorKind | None:
    """The error kind of a status code; None for one that is no kind (OK, INTERNAL, ...)."""
    return kind_of(code.value[0])


def details_metadata(code: grpc.StatusCode, message: str, info: ErrorInfo) -> tuple[tuple[str, bytes]]:
    """The trailing metadata that carries `info` in a call that ends with `code` and `message`
    (the Status repeats them, as grpcio-status checks)."""
    status = status_pb2.Status(code=code.value[0], message=message)
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason=info.reason, domain=DOMAIN, metadata=info.metadata))
    return ((DETAILS_KEY, status.SerializeToString()),)


def error_info(trailing_metadata: Metadata | None) -> ErrorInfo | None:
    """The ErrorInfo of FluxKV's domain in a failed call's trailing metadata; None if it has none."""
    for key, value in trailing_metadata or ():
        if key != DETAILS_KEY or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return None
        info = error_details_pb2.ErrorInfo()
        for detail in status.details:
            if detail.Unpack(info) and info.domain == DOMAIN:
                return ErrorInfo(info.reason, dict(info.metadata))
    return None
