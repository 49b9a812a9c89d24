"""Errors on the wire, for the node's transport, its forwarding and the client SDK:
a kind's status code is grpc's StatusCode of the number fluxkv/errors.py gives it.
"""

from __future__ import annotations

import grpc

from fluxkv.errors import ErrorKind, kind_of

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_code(kind: ErrorKind) -> grpc.StatusCode:
    return _STATUS_CODES[kind.value]


def kind_of_status(code: grpc.StatusCode) -> ErrorKind | None:
    """The error kind of a status code; None for one that is no kind (OK, INTERNAL, ...)."""
    return kind_of(code.value[0])
