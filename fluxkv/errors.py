"""The one error type that request handling raises.

Handlers and the store know nothing of gRPC: they raise KVError with a kind,
and the transport maps each kind to its status code in one place.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "invalid argument"  # the request breaks a limit or a rule
    ABORTED = "aborted"  # an expect_revision condition failed: read and retry
    FAILED_PRECONDITION = "failed precondition"  # the data cannot be served this way
    RESOURCE_EXHAUSTED = "resource exhausted"  # the answer would exceed a size limit
    UNAVAILABLE = "unavailable"  # the node cannot take the call now: retry later
    OUT_OF_RANGE = "out of range"  # a revision the node no longer holds


class KVError(Exception):
    """A request failed in a way the caller can act on."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __repr__(self) -> str:
        return f"KVError({self.kind.name}, {self.message!r})"


def invalid(message: str) -> KVError:
    return KVError(ErrorKind.INVALID_ARGUMENT, message)


def shown(text: str, width: int = 64) -> str:
    """`text` quoted for an error message, cut to `width` characters."""
    return repr(text if len(text) <= width else text[:width] + "...")
