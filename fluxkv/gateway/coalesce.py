"""Coalescing of reads (Go's singleflight, as Flux-KV's gateway has it): while
a read of a key is in flight, the same read asked again waits for its answer
instead of making another call to the node.

A read shares only a call that began after the gateway's last write of that
key ended: forget(key) at the start and at the end of every write through the
gateway, so a client that reads its own write after the gateway acknowledged it
never joins a call begun before the write was applied. Writes by other clients
are seen as they would be by a call at the moment the shared call began.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class Coalescer(Generic[T]):
    """Reads in flight, by key and scope: reads of one key in different scopes
    (the gateway's: the callers' tokens, which may see different things) share nothing."""

    def __init__(self) -> None:
        self._flights: dict[str, dict[Hashable, asyncio.Future[T]]] = {}
        self.shared = 0  # reads answered by another read's call

    async def do(self, key: str, scope: Hashable, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`'s outcome, shared with every `do` of the same key and scope while it
        is in flight. A caller that is cancelled leaves the call running for the others."""
        scopes = self._flights.setdefault(key, {})
        flight = scopes.get(scope)
        if flight is None:
            flight = scopes[scope] = asyncio.ensure_future(call())
            flight.add_done_callback(lambda done: self._landed(key, scope, done))
        else:
            self.shared += 1
        return await asyncio.shield(flight)

    def forget(self, key: str) -> None:
        """Later reads of `key` make a call of their own (those in flight still answer their callers)."""
        self._flights.pop(key, None)

    def _landed(self, key: str, scope: Hashable, flight: asyncio.Future[T]) -> None:
        scopes = self._flights.get(key)
        if scopes is not None and scopes.get(scope) is flight:
            del scopes[scope]
            if not scopes:
                del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # retrieved: its callers may all have gone
