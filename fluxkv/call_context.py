"""The deadline of the call being handled, for code that waits on a caller's
behalf. The transport sets it for each call; without one, there is none."""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar


def _none() -> float | None:
    return None


# Seconds left before the current call's deadline; None when it has none.
time_remaining: ContextVar[Callable[[], float | None]] = ContextVar("time_remaining", default=_none)
