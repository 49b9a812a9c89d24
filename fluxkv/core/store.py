"""The sharded in-memory map: 256 dicts, each guarded by its own lock.

A key's shard is CRC-32 (IEEE, as zlib.crc32) of its UTF-8 bytes modulo 256:
the same in every process and run. Every mutation takes the node's next
revision inside its shard's critical section and hands one ChangeRecord to
the attached sinks there, so sinks see records in the order applied.

A key's entry is one bytes object: its value followed by its mod_revision
(8 bytes, little-endian), which costs a key about 100 B less than a tuple of
the value and two ints (the 8 bytes mostly fit in the value's allocation);
reading it copies the value out. TTLs are absolute Unix-millisecond deadlines,
kept per shard for the keys that have one. A key past its deadline is expired
lazily when touched, and actively by expire_step(), which walks the shards'
deadline heaps with a bounded amount of work per call.

The store is thread-safe; the server calls it from its event loop thread,
where the locks are never contended.
"""

from __future__ import annotations

import bisect
import heapq
import secrets
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import NamedTuple

from fluxkv.core.changes import ChangeRecord, ChangeSink, Op, change_bytes, text_bytes

NUM_SHARDS = 256
# A Scan call stops after examining this many keys (plus the rest of the
# current shard), whatever it has collected, so one call never holds the node.
SCAN_WORK_BUDGET = 100_000
# Sorted key snapshots kept for scans in progress (one per scan and shard).
SCAN_SNAPSHOTS = 64
# A deadline heap is rebuilt once this many of its entries are stale and
# they outnumber the live ones.
_HEAP_REBUILD_MIN_STALE = 1024
# An entry's mod_revision, after its value.
_REVISION = struct.Struct("<Q")
_REVISION_SIZE = _REVISION.size
# Looking up an Enum member costs about 0.2 µs on Python 3.11: the write path uses these.
_SET, _DELETE, _EXPIRE = Op.SET, Op.DELETE, Op.EXPIRE


def shard_of(key: str) -> int:
    return zlib.crc32(key.encode()) & 0xFF


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class Entry(NamedTuple):
    """A key's entry as shard_entries() gives it (the store keeps it packed)."""

    value: bytes
    mod_revision: int
    expires_at_ms: int  # 0 = no TTL


class Item(NamedTuple):
    key: str
    value: bytes
    mod_revision: int
    ttl_ms: int  # remaining; 0 = no TTL


class Outcome(NamedTuple):
    """Result of a (possibly conditional) write.

    applied: False when expect_revision did not match (nothing changed).
    revision: the write's revision when applied; otherwise the key's current
        mod_revision (0 if absent). For a delete of a missing key, the
        store's revision.
    existed: whether the key existed (unexpired) before the call.
    """

    applied: bool
    revision: int
    existed: bool


class ScanPosition(NamedTuple):
    """Where a scan resumes: after key `after` in `shard` (None: at its start)."""

    token: int
    shard: int
    after: str | None


def _revision_of(packed: bytes) -> int:
    """The mod_revision of a packed entry (value + revision)."""
    revision: int = _REVISION.unpack_from(packed, len(packed) - _REVISION_SIZE)[0]
    return revision


def _refusal(old: bytes | None, expect_revision: int) -> Outcome | None:
    """The outcome of a failed expect_revision condition; None if it holds."""
    current = _revision_of(old) if old else 0
    return None if current == expect_revision else Outcome(False, current, old is not None)


class _Shard:
    __slots__ = ("data", "deadlines", "expired", "expiries", "lock", "nbytes", "stale")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # key -> value + mod_revision (see the module's docstring)
        self.data: dict[str, bytes] = {}
        # key -> deadline (Unix ms), for the keys that have a TTL.
        self.expiries: dict[str, int] = {}
        # Min-heap of (deadline, key); entries whose key was since rewritten
        # or deleted are stale and skipped when popped.
        self.deadlines: list[tuple[int, str]] = []
        self.stale = 0
        self.nbytes = 0  # UTF-8 key bytes + value bytes
        self.expired = 0  # keys removed because their TTL passed

    def entries(self) -> list[tuple[str, Entry]]:
        """Every entry, unpacked (expired ones included); the caller holds the lock."""
        expiries = self.expiries
        return [(k, Entry(p[:-_REVISION_SIZE], _revision_of(p), expiries.get(k, 0))) for k, p in self.data.items()]


class Store:
    def __init__(self, clock: Callable[[], int] = wall_clock_ms) -> None:
        self._clock = clock
        # Names this sequence of revisions: a store that starts empty starts a
        # new epoch at revision 1, so (epoch, revision) is unique for a node.
        self.epoch = secrets.token_hex(8)
        self._shards = [_Shard() for _ in range(NUM_SHARDS)]
        self._seq_lock = threading.Lock()
        self._revision = 0
        self._sinks: tuple[ChangeSink, ...] = ()
        self._expire_cursor = 0
        self._snapshots: OrderedDict[tuple[int, int, str], list[str]] = OrderedDict()
        self._snapshots_lock = threading.Lock()

    # -- sinks -------------------------------------------------------------

    def attach_sink(self, sink: ChangeSink) -> None:
        with self._seq_lock:
            self._sinks = (*self._sinks, sink)

    def detach_sink(self, sink: ChangeSink) -> None:
        with self._seq_lock:
            self._sinks = tuple(s for s in self._sinks if s is not sink)

    # -- reads -------------------------------------------------------------

    @property
    def revision(self) -> int:
        return self._revision

    def get(self, key: str) -> Item | None:
        index = zlib.crc32(key.encode()) & 0xFF
        shard = self._shards[index]
        with shard.lock:
            packed = shard.data.get(key)
            if packed is None:
                return None
            ttl = 0
            if shard.expiries and (deadline := shard.expiries.get(key)):
                now = self._clock()
                if deadline <= now:
                    self._expire(index, shard, key, packed, now)
                    return None
                ttl = deadline - now
            return _new_tuple(Item, (key, packed[:-_REVISION_SIZE], _revision_of(packed), ttl))

    def __len__(self) -> int:
        return sum(len(s.data) for s in self._shards)

    @property
    def data_bytes(self) -> int:
        return sum(s.nbytes for s in self._shards)

    @property
    def expired_keys(self) -> int:
        return sum(s.expired for s in self._shards)

    def shard_key_counts(self) -> list[int]:
        return [len(s.data) for s in self._shards]

    # -- writes ------------------------------------------------------------

    def set(self, key: str, value: bytes, ttl_ms: int = 0, expect_revision: int | None = None) -> Outcome:
        kb = key.encode()
        index = zlib.crc32(kb) & 0xFF
        shard = self._shards[index]
        with shard.lock:
            now = self._clock()
            old = shard.data.get(key)
            if old is not None and shard.expiries:
                old = self._live(index, shard, key, old, now)
            if expect_revision is not None and (refused := _refusal(old, expect_revision)) is not None:
                return refused
            expires_at = now + ttl_ms if ttl_ms else 0
            revision = self._commit(index, _SET, key, value, expires_at, now)
            self._put(shard, key, kb, value, revision, expires_at, old)
            return _new_tuple(Outcome, (True, revision, old is not None))

    def delete(self, key: str, expect_revision: int | None = None) -> Outcome:
        kb = key.encode()
        index = zlib.crc32(kb) & 0xFF
        shard = self._shards[index]
        with shard.lock:
            now = self._clock()
            old = shard.data.get(key)
            if old is not None and shard.expiries:
                old = self._live(index, shard, key, old, now)
            if expect_revision is not None and (refused := _refusal(old, expect_revision)) is not None:
                return refused
            if old is None:
                return Outcome(True, self._revision, False)
            revision = self._commit(index, _DELETE, key, None, 0, now)
            self._remove(shard, key, len(kb), old)
            return Outcome(True, revision, True)

    # -- persistence (the append-only file) ----------------------------------

    def restore(self, epoch: str, revision: int) -> None:
        """Continue the sequence of a replayed file: its epoch, its last revision."""
        with self._seq_lock:
            self.epoch = epoch
            self._revision = revision

    def load(self, key: str, value: bytes, mod_revision: int, expires_at_ms: int) -> None:
        """Put an entry as the append-only file recorded it, without taking a
        revision or telling the sinks (replay only)."""
        kb = key.encode()
        shard = self._shards[zlib.crc32(kb) & 0xFF]
        with shard.lock:
            old = shard.data.get(key)
            if old is None and not expires_at_ms:  # the common case, made quick for a replay
                shard.data[key] = value + _REVISION.pack(mod_revision)
                shard.nbytes += len(kb) + len(value)
            else:
                self._put(shard, key, kb, value, mod_revision, expires_at_ms, old)

    def unload(self, key: str) -> None:
        """Remove a key as the append-only file recorded it (replay only)."""
        kb = key.encode()
        shard = self._shards[zlib.crc32(kb) & 0xFF]
        with shard.lock:
            packed = shard.data.get(key)
            if packed is not None:
                self._remove(shard, key, len(kb), packed)

    def shard_entries(self, index: int) -> list[tuple[str, Entry]]:
        """A copy of one shard's unexpired entries, taken under its lock (a
        rewrite takes the store shard by shard: no global pause)."""
        shard = self._shards[index]
        with shard.lock:
            now = self._clock()
            return [(k, e) for k, e in shard.entries() if not e.expires_at_ms or e.expires_at_ms > now]

    # -- expiry ------------------------------------------------------------

    def expire_step(self, budget: int) -> int:
        """Expire keys whose deadline has passed, examining at most `budget`
        deadline entries; returns how many it examined (== budget means more
        may be due). Resumes at the shard where the last call stopped."""
        examined = 0
        for _ in range(NUM_SHARDS):
            index = self._expire_cursor
            shard = self._shards[index]
            with shard.lock:
                now = self._clock()
                heap = shard.deadlines
                while heap and heap[0][0] <= now and examined < budget:
                    deadline, key = heapq.heappop(heap)
                    examined += 1
                    if shard.expiries.get(key) == deadline:
                        self._expire(index, shard, key, shard.data[key], now)
                    # The popped slot was stale, or belonged to the entry just
                    # expired (which _remove counted as stale).
                    shard.stale -= 1
                if shard.stale >= _HEAP_REBUILD_MIN_STALE and shard.stale * 2 > len(heap):
                    shard.deadlines = [(d, k) for k, d in shard.expiries.items()]
                    heapq.heapify(shard.deadlines)
                    shard.stale = 0
            if examined >= budget:
                break
            self._expire_cursor = (index + 1) % NUM_SHARDS
        return examined

    # -- scan --------------------------------------------------------------

    def scan(
        self, prefix: str, start: ScanPosition, limit: int, max_bytes: int, with_values: bool
    ) -> tuple[list[Item], ScanPosition | None]:
        """One page of keys starting with `prefix`, in (shard, key) order.

        Stops at `limit` items, at `max_bytes` of keys (and values), or once
        SCAN_WORK_BUDGET keys were examined. Returns the items and where to
        resume (None when the scan is complete).
        """
        items: list[Item] = []
        size = 0
        examined = 0
        token, index, after = start
        while index < NUM_SHARDS:
            keys, cost = self._snapshot(token, index, prefix)
            examined += cost
            shard = self._shards[index]
            position = bisect.bisect_right(keys, after) if after is not None else 0
            with shard.lock:
                now = self._clock()
                data, expiries = shard.data, shard.expiries
                for key in keys[position:]:
                    packed = data.get(key)
                    if packed is None:
                        continue
                    deadline = expiries.get(key, 0) if expiries else 0
                    if deadline and deadline <= now:
                        continue
                    value = packed[:-_REVISION_SIZE] if with_values else b""
                    items.append(Item(key, value, _revision_of(packed), deadline - now if deadline else 0))
                    size += change_bytes(key, value)
                    if len(items) >= limit or size >= max_bytes:
                        return items, ScanPosition(token, index, key)
            self._forget_snapshot(token, index, prefix)
            index += 1
            after = None
            if examined >= SCAN_WORK_BUDGET:
                break
        return items, (ScanPosition(token, index, None) if index < NUM_SHARDS else None)

    def _snapshot(self, token: int, index: int, prefix: str) -> tuple[list[str], int]:
        """The sorted keys of a shard that start with prefix, as of the first
        time this scan reached the shard (rebuilt if evicted meanwhile), and
        how many keys were examined to get them."""
        cache_key = (token, index, prefix)
        with self._snapshots_lock:
            keys = self._snapshots.get(cache_key)
            if keys is not None:
                self._snapshots.move_to_end(cache_key)
                return keys, 0
        shard = self._shards[index]
        with shard.lock:
            examined = len(shard.data)
            keys = [k for k in shard.data if k.startswith(prefix)] if prefix else list(shard.data)
        keys.sort()
        with self._snapshots_lock:
            self._snapshots[cache_key] = keys
            while len(self._snapshots) > SCAN_SNAPSHOTS:
                self._snapshots.popitem(last=False)
        return keys, examined

    def _forget_snapshot(self, token: int, index: int, prefix: str) -> None:
        with self._snapshots_lock:
            self._snapshots.pop((token, index, prefix), None)

    # -- internals (callers hold the shard's lock) -------------------------

    def _commit(self, index: int, op: Op, key: str, value: bytes | None, expires_at: int, now: int) -> int:
        """Take the next revision and hand the change to the sinks, in order."""
        with self._seq_lock:
            revision = self._revision + 1
            self._revision = revision
            if self._sinks:
                record = _new_tuple(ChangeRecord, (revision, op, key, value, expires_at, now, index))
                for sink in self._sinks:
                    sink.append(record)
        return revision

    def _live(self, index: int, shard: _Shard, key: str, packed: bytes, now: int) -> bytes | None:
        """The key's entry, expiring it first if its deadline has passed."""
        deadline = shard.expiries.get(key)
        if deadline is not None and deadline <= now:
            self._expire(index, shard, key, packed, now)
            return None
        return packed

    def _expire(self, index: int, shard: _Shard, key: str, packed: bytes, now: int) -> None:
        self._commit(index, _EXPIRE, key, None, 0, now)
        self._remove(shard, key, text_bytes(key), packed)
        shard.expired += 1

    @staticmethod
    def _put(
        shard: _Shard, key: str, kb: bytes, value: bytes, revision: int, expires_at: int, old: bytes | None
    ) -> None:
        """Store the entry in place of `old` (None: the key is new)."""
        shard.data[key] = value + _REVISION.pack(revision)
        if old is None:
            shard.nbytes += len(kb) + len(value)
        else:
            shard.nbytes += len(value) - (len(old) - _REVISION_SIZE)
        expiries = shard.expiries
        if expiries and expiries.pop(key, 0):
            shard.stale += 1
        if expires_at:
            expiries[key] = expires_at
            heapq.heappush(shard.deadlines, (expires_at, key))

    @staticmethod
    def _remove(shard: _Shard, key: str, key_bytes: int, packed: bytes) -> None:
        del shard.data[key]
        shard.nbytes -= key_bytes + len(packed) - _REVISION_SIZE
        if shard.expiries and shard.expiries.pop(key, 0):
            shard.stale += 1


# Builds the NamedTuples made once per call (Item, Outcome, ChangeRecord) for
# half the cost of their own __new__: _new_tuple(Item, (key, value, ...)).
_new_tuple = tuple.__new__
