"""Watch: the node's recent changes, kept in memory for watchers to follow.

WatchHub is a change sink. It keeps the latest change records in a ring
indexed by revision (every revision is exactly one record, so revision N sits
at N % size): at most `max_records` of them and at most `max_bytes` of keys
and values, but always the latest one. A watcher has no queue of its own,
only a cursor (the next revision it wants): it reads the ring from its cursor
on, and once it has read everything it waits for the next append. A watcher
whose next revision was evicted before it read it has fallen behind and ends
with OUT_OF_RANGE. A slow watcher costs its cursor and the batch it is sending.

The hub must be attached before the store's first write (its history starts
at revision 1, or after the revision an append-only file restored: see
start_after), and like every sink it is called on the event loop's thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from fluxkv.core.changes import ChangeRecord, record_bytes
from fluxkv.core.errors import ErrorKind, KVError

_RESYNC = "re-read the keys (note Info's revision R first, then Scan) and watch again from R + 1"


class WatchHub:
    __slots__ = (
        "_appended",
        "_bytes",
        "_closed",
        "_fell_behind",
        "_newest",
        "_oldest",
        "_records",
        "_sizes",
        "_watchers",
        "max_bytes",
        "max_records",
    )

    def __init__(self, max_records: int, max_bytes: int) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        # Slot N % max_records holds revision N while oldest <= N <= newest.
        self._records: list[ChangeRecord | None] = [None] * max_records
        self._sizes = [0] * max_records  # key + value bytes of each slot's record
        self._oldest = 1  # the oldest revision held (newest + 1 while none is)
        self._newest = 0
        self._bytes = 0
        self._watchers = 0
        self._fell_behind = 0
        # Set by the next append; exists only while a watcher waits for one.
        self._appended: asyncio.Event | None = None
        self._closed = False

    def start_after(self, revision: int) -> None:
        """Begin the history after `revision` (a store restored from its
        append-only file continues there); only before the first append."""
        assert self._newest < self._oldest, "start_after() after an append"
        self._oldest, self._newest = revision + 1, revision

    # -- the store's side ----------------------------------------------------

    def append(self, record: ChangeRecord) -> None:
        """Keep `record` (the next revision), evicting the oldest as needed."""
        size = record_bytes(record)
        revision = record.revision
        slot = revision % self.max_records
        if revision - self._oldest >= self.max_records:  # full: the slot holds the oldest
            self._bytes -= self._sizes[slot]
            self._oldest += 1
        self._records[slot] = record
        self._sizes[slot] = size
        self._newest = revision
        self._bytes += size
        if self._bytes > self.max_bytes:
            self._evict_for_bytes()
        if self._appended is not None:
            self._appended.set()
            self._appended = None

    def _evict_for_bytes(self) -> None:
        records, sizes, n = self._records, self._sizes, self.max_records
        while self._bytes > self.max_bytes and self._oldest < self._newest:
            slot = self._oldest % n
            self._bytes -= sizes[slot]
            records[slot] = None
            self._oldest += 1

    # -- the watchers' side ----------------------------------------------------

    def watch(
        self, prefix: str, start_revision: int, max_items: int, max_bytes: int
    ) -> AsyncGenerator[list[ChangeRecord], None]:
        """The changes to keys starting with `prefix`, from `start_revision`
        on (0: from the next change), in batches of consecutive matching
        records of at most `max_items` and about `max_bytes` (a larger record
        comes alone).

        The start is checked and fixed now (KVError OUT_OF_RANGE when it is no
        longer held, UNAVAILABLE once closed); iterating may raise the same
        errors later, when the watcher falls behind or the hub closes.
        """
        if self._closed:
            raise _shutting_down()
        if start_revision == 0:
            start_revision = self._newest + 1
        elif start_revision < self._oldest:
            raise KVError(
                ErrorKind.OUT_OF_RANGE,
                f"revision {start_revision} is no longer held: the oldest this node holds is {self._oldest} "
                f"({self._limits()}); {_RESYNC}",
            )
        return self._follow(prefix, start_revision, max_items, max_bytes)

    async def _follow(
        self, prefix: str, cursor: int, max_items: int, max_bytes: int
    ) -> AsyncGenerator[list[ChangeRecord], None]:
        self._watchers += 1
        try:
            while True:
                if self._closed:
                    raise _shutting_down()
                if cursor > self._newest:
                    if self._appended is None:
                        self._appended = asyncio.Event()
                    await self._appended.wait()
                    continue
                if cursor < self._oldest:
                    self._fell_behind += 1
                    raise KVError(
                        ErrorKind.OUT_OF_RANGE,
                        f"this watch fell behind: it needed revision {cursor}, but the oldest this node still "
                        f"holds is {self._oldest} ({self._limits()}); {_RESYNC}",
                    )
                batch, cursor = self._read(prefix, cursor, max_items, max_bytes)
                if batch:
                    yield batch
        finally:
            self._watchers -= 1

    def _read(self, prefix: str, cursor: int, max_items: int, max_bytes: int) -> tuple[list[ChangeRecord], int]:
        """The matching records from `cursor` on, up to a batch's limits, and
        the revision to read next."""
        records, sizes, n = self._records, self._sizes, self.max_records
        batch: list[ChangeRecord] = []
        size = 0
        while cursor <= self._newest:
            slot = cursor % n
            record = records[slot]
            assert record is not None  # held: oldest <= cursor <= newest
            if record.key.startswith(prefix):
                if batch and (len(batch) >= max_items or size + sizes[slot] > max_bytes):
                    break
                batch.append(record)
                size += sizes[slot]
            cursor += 1
        return batch, cursor

    def close(self) -> None:
        """End every watch with UNAVAILABLE and refuse new ones."""
        self._closed = True
        if self._appended is not None:
            self._appended.set()
            self._appended = None

    # -- for Info ------------------------------------------------------------

    @property
    def watchers(self) -> int:
        """Watches being streamed (counted from their first read)."""
        return self._watchers

    @property
    def oldest_revision(self) -> int:
        """The oldest revision held (newest_revision + 1 while none is)."""
        return self._oldest

    @property
    def newest_revision(self) -> int:
        return self._newest

    @property
    def held_bytes(self) -> int:
        return self._bytes

    @property
    def fell_behind(self) -> int:
        """Watches ended with OUT_OF_RANGE because their next change was evicted."""
        return self._fell_behind

    def describe(self) -> str:
        held = self._newest - self._oldest + 1
        history = f"revisions {self._oldest} to {self._newest}" if held else "no changes yet"
        return (
            f"{self._watchers} watchers; holds {history} ({held} changes, {self._bytes} bytes; {self._limits()}); "
            f"{self._fell_behind} watchers fell behind and were ended"
        )

    def _limits(self) -> str:
        return (
            f"FLUX_WATCH_HISTORY keeps {self.max_records} changes, "
            f"FLUX_WATCH_HISTORY_BYTES at most {self.max_bytes} bytes of them"
        )


def _shutting_down() -> KVError:
    return KVError(ErrorKind.UNAVAILABLE, "the node is shutting down; watch another node or retry")
