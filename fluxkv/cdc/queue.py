"""The bounded queue between the store and the CDC publisher.

It is a change sink: the store appends every record under its locks, from the
event loop's thread, and append() only links the record in (no I/O, no
waiting). A record stays counted in the queue until the broker confirms it,
so the bounds cap everything CDC holds in memory.

When the queue is full, the policy decides:
- "block": a write first waits for room (admit()), up to the call's deadline
  and FLUX_CDC_BLOCK_TIMEOUT_MS, then fails with UNAVAILABLE; once admitted,
  its records are never refused. Expiry records are not admitted first (no
  caller waits for them) and may take the queue past its bounds; each one
  removed a key from the store, which freed at least as much memory.
- "drop": every record that does not fit is dropped and counted.
- "spill" (the node has an append-only file): every record that does not fit
  is left out and counted; the publisher reads it back from the file.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from fluxkv.core.changes import ChangeRecord, record_bytes
from fluxkv.core.errors import ErrorKind, KVError


class CdcQueue:
    def __init__(self, max_events: int, max_bytes: int, policy: str, block_timeout_ms: int) -> None:
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.policy = policy
        # Records that do not fit are left out: dropped, or spilled to the AOF.
        self._leave_out = policy in ("drop", "spill")
        self._block_timeout = block_timeout_ms / 1000
        self._pending: deque[ChangeRecord] = deque()
        self.depth = 0  # events held: pending + published and unconfirmed
        self.held_bytes = 0
        self.pending_bytes = 0
        self.queued = 0
        self.dropped = 0
        self.spilled = 0
        self.writes_delayed = 0
        self.writes_refused = 0
        # Writes waiting for room, first come first served: (events, bytes, future).
        self._room_waiters: deque[tuple[int, int, asyncio.Future[None]]] = deque()
        self._on_append: asyncio.Future[None] | None = None

    # -- the store's side ----------------------------------------------------

    def append(self, record: ChangeRecord) -> None:
        size = record_bytes(record)
        if self._leave_out and (self.depth >= self.max_events or self.held_bytes + size > self.max_bytes):
            if self.policy == "drop":
                self.dropped += 1
            else:
                self.spilled += 1
            return
        self._pending.append(record)
        self.depth += 1
        self.held_bytes += size
        self.pending_bytes += size
        self.queued += 1
        waiter = self._on_append
        if waiter is not None:
            self._on_append = None
            if not waiter.done():
                waiter.set_result(None)

    # -- the request path's side (policy "block") ------------------------------

    async def admit(self, events: int, nbytes: int, time_remaining: Callable[[], float | None]) -> None:
        """Return once `events` records of `nbytes` fit; raise UNAVAILABLE if
        they do not fit in time. `time_remaining` gives the call's deadline."""
        if (
            not self._room_waiters
            and self.depth + events <= self.max_events
            and self.held_bytes + nbytes <= self.max_bytes
        ):
            return
        timeout = self._block_timeout
        remaining = time_remaining()
        if remaining is not None:
            # Answer a little before the caller's deadline, so that it gets
            # this explanation rather than DEADLINE_EXCEEDED.
            timeout = min(timeout, remaining - min(0.05, remaining / 10))
        self.writes_delayed += 1
        room: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (events, nbytes, room)
        self._room_waiters.append(entry)
        admitted = False
        try:
            await asyncio.wait_for(room, max(timeout, 0))
            admitted = True
        except TimeoutError:
            self.writes_refused += 1
            raise KVError(
                ErrorKind.UNAVAILABLE,
                f"the CDC queue is full ({self.depth} events, {self.held_bytes} bytes; FLUX_CDC_QUEUE_EVENTS "
                f"{self.max_events}, FLUX_CDC_QUEUE_BYTES {self.max_bytes}) and did not drain within "
                f"{max(timeout, 0):.3f} s: the broker is slow or unreachable; nothing was written, retry later",
            ) from None
        finally:
            self._room_waiters.remove(entry)
            if not admitted:  # refused or cancelled: whoever waits behind may fit now
                self._wake_room_waiters()

    def _wake_room_waiters(self) -> None:
        """Let waiting writes in, in arrival order, while they fit."""
        events, nbytes = self.depth, self.held_bytes
        for want, size, room in self._room_waiters:
            if room.done():
                if not room.cancelled():  # woken, not yet written: its room is taken
                    events += want
                    nbytes += size
                continue
            if events + want > self.max_events or nbytes + size > self.max_bytes:
                break
            events += want
            nbytes += size
            room.set_result(None)

    # -- the publisher's side ------------------------------------------------

    @property
    def pending(self) -> int:
        """Records not yet taken by the publisher."""
        return len(self._pending)

    @property
    def next_revision(self) -> int:
        """The revision of the next record to take (0 if none)."""
        return self._pending[0].revision if self._pending else 0

    def take(self) -> ChangeRecord:
        record = self._pending.popleft()
        self.pending_bytes -= record_bytes(record)
        return record

    def wake_on_append(self, waiter: asyncio.Future[None]) -> None:
        """Complete `waiter` at the next append."""
        self._on_append = waiter

    def release(self, events: int, nbytes: int) -> None:
        """The broker confirmed these records: they leave the queue."""
        self.depth -= events
        self.held_bytes -= nbytes
        if self._room_waiters:
            self._wake_room_waiters()
