"""The active expiry cycle: removes keys whose TTL has passed even if no one
touches them again, with bounded work per cycle (as Redis does)."""

from __future__ import annotations

import asyncio

from fluxkv.core.store import Store


class ActiveExpiry:
    def __init__(self, store: Store, interval_ms: int, batch: int) -> None:
        self._store = store
        self._interval = interval_ms / 1000
        self._batch = batch
        self.cycles = 0
        # Cycles that examined a whole batch: more keys were due at once
        # than one cycle may handle, so the next cycle ran without a pause.
        self.batch_limit_hits = 0

    async def run(self) -> None:
        while True:
            examined = self._store.expire_step(self._batch)
            self.cycles += 1
            if examined >= self._batch:
                self.batch_limit_hits += 1
                await asyncio.sleep(0)  # let requests in, then go on
            else:
                await asyncio.sleep(self._interval)

    def describe(self) -> str:
        return (
            f"every {self._interval * 1000:g} ms, at most {self._batch} entries a cycle; "
            f"{self._store.expired_keys} keys expired; batch limit reached {self.batch_limit_hits} times"
        )
