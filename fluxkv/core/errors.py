"""The error kinds of the API, and the one error type that request handling raises.

Handlers and the store know nothing of gRPC: they raise KVError with a kind.
Each kind is the gRPC status code of its name, and its value is that code's
number (what a call's `grpc-status` carries), so this enum is the one map
between kinds and status codes, both ways; fluxkv/rpc/status.py turns the
numbers into grpc's StatusCode for the transport, forwarding and the client.

A KVError may also carry an ErrorInfo: the structured details of the failure,
for programs (the message is for people). On the wire it is a
google.rpc.ErrorInfo of the domain DOMAIN (fluxkv/rpc/status.py).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = 3  # the request breaks a limit or a rule
    DEADLINE_EXCEEDED = 4  # no answer within the call's deadline: the call may or may not have been applied
    PERMISSION_DENIED = 7  # the caller's token does not allow this method, key or prefix
    RESOURCE_EXHAUSTED = 8  # the answer would exceed a size limit
    FAILED_PRECONDITION = 9  # the data cannot be served this way
    ABORTED = 10  # an expect_revision condition failed: read and retry
    OUT_OF_RANGE = 11  # a revision the node no longer holds
    UNAVAILABLE = 14  # the node cannot take the call now (and did not apply it): retry later
    UNAUTHENTICATED = 16  # no token, or one the node does not know (FLUX_AUTH_TOKENS_FILE)


_KINDS = {kind.value: kind for kind in ErrorKind}


def kind_of(code: int) -> ErrorKind | None:
    """The kind of gRPC status code number `code`; None for a code that is not one (OK, INTERNAL, ...)."""
    return _KINDS.get(code)


# ErrorInfo's domain for every reason below.
DOMAIN = "fluxkv"
# An expect_revision condition failed (ABORTED). Metadata: "key", the key as
# sent, and "revision", the key's current revision in decimal ("0": absent).
REVISION_MISMATCH = "REVISION_MISMATCH"


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """Why a call failed, for programs: a reason (a constant of this module)
    and its metadata, as google.rpc.ErrorInfo has them."""

    reason: str
    metadata: Mapping[str, str]


class KVError(Exception):
    """A request failed in a way the caller can act on."""

    def __init__(self, kind: ErrorKind, message: str, info: ErrorInfo | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.info = info

    def __repr__(self) -> str:
        return f"KVError({self.kind.name}, {self.message!r})"


def invalid(message: str) -> KVError:
    return KVError(ErrorKind.INVALID_ARGUMENT, message)


def revision_mismatch(key: str, revision: int) -> ErrorInfo:
    """The details of a failed expect_revision condition on `key`, now at `revision` (0: absent)."""
    return ErrorInfo(REVISION_MISMATCH, {"key": key, "revision": str(revision)})


def current_revision(info: ErrorInfo | None) -> int | None:
    """The key's current revision that a REVISION_MISMATCH reports; None for other details, or none."""
    if info is None or info.reason != REVISION_MISMATCH:
        return None
    revision = info.metadata.get("revision", "")
    return int(revision) if revision.isdecimal() else None


def shown(text: str, width: int = 64) -> str:
    """`text` quoted for an error message, cut to `width` characters."""
    return repr(text if len(text) <= width else text[:width] + "...")
