"""What request handling may ask of the call being served (its deadline,
whether another node forwarded it, its authorization) without knowing the transport. The
transport sets `current` for each call; outside a call there is none."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Protocol

# Metadata a node adds to a call it forwards to the key's owner: the
# receiving node then serves it itself, whatever its own view of the ring.
FORWARDED_BY = "fluxkv-forwarded-by"
# The caller's token, "Bearer <token>" (docs/security.md); a forwarded call carries it on.
AUTHORIZATION = "authorization"


class Call(Protocol):
    def time_remaining(self) -> float | None: ...
    def invocation_metadata(self) -> Sequence[tuple[str, str | bytes]] | None: ...


current: ContextVar[Call | None] = ContextVar("current_call", default=None)

# What pygrpc-native (as grpcio's sync server) reports for a call without a
# deadline, where grpc.aio reports None.
_NO_DEADLINE_S = float(sys.maxsize)


def time_remaining() -> float | None:
    """Seconds left before the current call's deadline; None when it has none."""
    call = current.get()
    remaining = call.time_remaining() if call is not None else None
    return None if remaining is None or remaining >= _NO_DEADLINE_S else remaining


def forwarded() -> bool:
    """Whether another node forwarded the current call to this one."""
    return metadata_value(FORWARDED_BY) is not None


def metadata_value(key: str) -> str | bytes | None:
    """The value of the current call's first metadata entry `key`; None without one (or outside a call)."""
    call = current.get()
    return None if call is None else value_in(call.invocation_metadata(), key)


def value_in(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str | bytes | None:
    """The value of the first entry `key` of `metadata`; None without one."""
    for k, value in metadata or ():
        if k == key:
            return value
    return None
