"""The append-only file (AOF): every change record, in revision order, on disk.

AppendOnlyFile is a change sink. append() only links the record into a deque;
a writer thread takes what has accumulated, encodes it (aof_format), writes it
with one write() and, by FLUX_AOF_APPEND_FSYNC, fsyncs it (group commit):
- always: every batch is fsynced, and a write is acknowledged only once the
  batch holding it is (handlers await acknowledged());
- everysec: batches are written at once and fsynced at most a second later;
- no: batches are written at once and the OS decides when they reach the disk.

Start-up replays the file into the store (replay()). A rewrite (aof_rewrite)
replaces the file with a snapshot of the live keys plus the changes made
meanwhile.

With CDC on, the file is also the CDC publisher's source of truth: the
publisher publishes only changes the file already holds as durably as the
policy promises (cdc_safe_revision), reads back from the file what its
in-memory queue did not keep (read_changes), and the revision the broker
confirmed is kept in a checkpoint file beside the AOF, so that a restarted
node publishes from there on. docs/aof.md has the format and the guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple

import orjson

from fluxkv.aof import file_format as aof_format
from fluxkv.aof import rewrite as aof_rewrite
from fluxkv.aof.file_format import AofCorrupt, Header, Snapshot, Torn
from fluxkv.core.changes import ChangeRecord, Op, record_bytes
from fluxkv.core.errors import ErrorKind, KVError
from fluxkv.core.store import Store, wall_clock_ms
from fluxkv.obs.metrics import Family, counter, gauge, states

log = logging.getLogger("fluxkv.aof")

# A failed write is tried again this often; the node refuses writes meanwhile.
RETRY_INTERVAL_S = 1.0
# The checkpoint file is rewritten at most this often (and at shutdown).
CHECKPOINT_INTERVAL_S = 1.0
# With everysec and no, the writer lets changes accumulate this long after
# the first one before it writes them: nobody waits for those writes, and one
# write() and one thread wake-up per batch, not per change, is what they cost.
WRITE_LINGER_S = 0.005


class ReplayResult(NamedTuple):
    epoch: str
    revision: int
    records: int  # change and snapshot records applied
    size: int  # bytes of the file once any torn tail was cut off
    tail_offset: int  # where the change records after the snapshot begin
    torn: Torn | None
    seconds: float


def replay(path: str, store: Store, now_ms: int | None = None) -> ReplayResult | None:
    """Load the file at `path` into an empty store and cut off a torn last
    record (with one warning). None if there is no file (or a crash left only
    part of its header). AofCorrupt if it is corrupt before its last record."""
    started = time.perf_counter()
    now = wall_clock_ms() if now_ms is None else now_ms
    header: Header | None = None
    revision = last_change = records = 0
    end = tail_offset = 0
    torn: Torn | None = None
    load, unload = store.load, store.unload
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        for item in aof_format.read_records(f, path):
            if isinstance(item, Torn):
                torn = item
                break
            offset, size, record = item
            end = offset + size
            if isinstance(record, ChangeRecord):
                if header is None or record.revision <= last_change:
                    raise AofCorrupt(path, offset, f"revision {record.revision} follows {last_change}: out of order")
                if last_change == 0:
                    tail_offset = offset
                last_change = record.revision
                if record.op is Op.SET and not (record.expires_at_ms and record.expires_at_ms <= now):
                    assert record.value is not None
                    load(record.key, record.value, record.revision, record.expires_at_ms)
                else:
                    unload(record.key)
            elif isinstance(record, Snapshot):
                if header is None or last_change:
                    raise AofCorrupt(path, offset, "a snapshot record out of place")
                if not (record.expires_at_ms and record.expires_at_ms <= now):
                    load(record.key, record.value, record.mod_revision, record.expires_at_ms)
                revision = max(revision, record.mod_revision)
            elif header is None:
                header = record
                revision = record.base_revision
                continue
            else:
                raise AofCorrupt(path, offset, "a second header record")
            records += 1
    if header is None and torn is None:
        raise AofCorrupt(path, len(aof_format.MAGIC), "the file has no header record")
    if torn is not None:
        log.warning(
            "%s: cutting off a torn last record at byte offset %d (%s): a crash interrupted its write",
            path,
            torn.offset,
            torn.reason,
        )
        os.truncate(path, torn.offset)
        aof_format.fsync_file(path)
        end = torn.offset
    if header is None:  # torn inside its header: the file never held a change
        os.unlink(path)
        return None
    store.restore(header.epoch, max(revision, last_change))
    return ReplayResult(
        header.epoch,
        max(revision, last_change),
        records,
        end,
        tail_offset if last_change else end,
        torn,
        time.perf_counter() - started,
    )


@dataclass(frozen=True)
class AofSettings:
    path: str
    fsync: str
    rewrite_min_bytes: int
    rewrite_percent: int
    buffer_bytes: int


class AofCounters(NamedTuple):
    """A snapshot of the file's state (fields as Info's AofStatus)."""

    path: str
    fsync_policy: str
    state: str  # "ok", "failing" (writes refused, retrying) or "failed"
    size_bytes: int
    base_size_bytes: int  # size after the last rewrite (or at start)
    written_revision: int
    durable_revision: int
    records_written: int
    batches_written: int
    fsyncs: int
    writes_delayed: int
    rewrites: int
    rewrite_in_progress: bool
    last_rewrite_seconds: float
    cdc_checkpoint_revision: int
    error: str


class _Waiters:
    """Futures waiting for a revision to reach some level, lowest first."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def __bool__(self) -> bool:
        return bool(self._heap)

    def add(self, revision: int) -> asyncio.Future[None]:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (revision, next(self._seq), future))
        return future

    def reached(self, revision: int) -> None:
        heap = self._heap
        while heap and heap[0][0] <= revision:
            future = heapq.heappop(heap)[2]
            if not future.done():
                future.set_result(None)

    def fail(self, exc: BaseException) -> None:
        for _, _, future in self._heap:
            if not future.done():
                future.set_exception(exc)
        self._heap.clear()


class AppendOnlyFile:
    """The AOF of one node: replayed by open(), written by a thread from start()
    to close(). append() is called from the event loop's thread (a sink)."""

    def __init__(self, settings: AofSettings, store: Store) -> None:
        self.path = settings.path
        self.fsync_policy = settings.fsync
        self._rewrite_min = settings.rewrite_min_bytes
        self._rewrite_percent = settings.rewrite_percent
        self._buffer_bytes = settings.buffer_bytes
        self.store = store
        self.checkpoint_path = self.path + ".cdc-checkpoint"
        # The store's side (event loop thread).
        self._pending: deque[ChangeRecord] = deque()
        self._appended_bytes = 0
        self._last_appended = 0
        # The writer thread's side; _io_lock guards the file, its offsets and
        # the switch to a rewritten file.
        self._io_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._sync_until = 0  # fsync up to this revision whatever the policy (sync())
        self._fd = -1
        self._offset = 0  # bytes written (the file's size)
        self._tail_offset = 0  # where the change records after the snapshot begin
        self._generation = 0  # bumped when a rewrite replaces the file
        self._base_size = 0
        self._taken_bytes = 0
        self._written_rev = 0
        self._durable_rev = 0
        self._retry_data = b""
        self._retry_rev = 0
        self.records_written = 0
        self.batches_written = 0
        self.fsyncs = 0
        self.state = "ok"
        self.error = ""
        self._fatal = False
        self.rewrites = 0
        self.last_rewrite_seconds = 0.0
        self._rewrite_thread: threading.Thread | None = None
        self._rewrite_done: asyncio.Future[None] | None = None
        self._rewrite_abort = False
        # CDC: the broker's confirmed revision, and what the checkpoint file holds.
        self.cdc_enabled = False
        self._cdc_confirmed = 0
        self.cdc_checkpoint = 0
        self._checkpoint_written_at = 0.0
        self._read_cursor = (-1, 0, 0)  # generation, offset, last revision read before it
        self._loop: asyncio.AbstractEventLoop | None = None
        # The CDC publisher's view of what it may publish, changed only on the
        # event loop (by _progress), so that want_progress() compares against
        # what the publisher saw.
        self.cdc_safe_revision = 0
        self.writes_delayed = 0
        self._durable_waiters = _Waiters()
        self._written_waiters = _Waiters()
        self._listeners: list[Callable[[], None]] = []
        # Set on the event loop when a write or sync() waits for the writer's
        # progress, or when the CDC publisher waits for cdc_safe_revision to
        # pass what it last saw; the writer reports only then (or an error).
        self._wants_progress = False
        self._cdc_wants_past = -1

    # -- start-up ----------------------------------------------------------------

    def open(self, cdc: bool) -> ReplayResult | None:
        """Replay the file into the (empty) store, or create it; with `cdc`,
        read the checkpoint (or start one at the replayed revision)."""
        _remove_if_present(self.path + ".rewrite")
        result = replay(self.path, self.store)
        if result is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            header = aof_format.encode_header(Header(self.store.epoch, 0, wall_clock_ms()))
            aof_format.replace_file(self.path, header)
            size = tail = len(header)
        else:
            size, tail = result.size, result.tail_offset
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._offset = self._base_size = size
        self._tail_offset = tail
        revision = self.store.revision
        self._written_rev = self._durable_rev = self._last_appended = revision
        self.cdc_safe_revision = revision
        self.cdc_enabled = cdc
        if cdc:
            checkpoint = self._read_checkpoint()
            if checkpoint is None or checkpoint > revision:
                # No checkpoint of this file (CDC was off, or the file is new):
                # publish from here on, and say so durably before anything else.
                checkpoint = revision
                self._write_checkpoint(revision)
            self._cdc_confirmed = self.cdc_checkpoint = checkpoint
        return result

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._writer, name="fluxkv-aof-writer", daemon=True)
        self._thread.start()

    # -- the store's side (a sink) -------------------------------------------------

    def append(self, record: ChangeRecord) -> None:
        self._pending.append(record)
        self._appended_bytes += record_bytes(record)
        self._last_appended = record.revision
        if not self._wake.is_set():
            self._wake.set()

    # -- the request path's side -------------------------------------------------

    def check_writable(self) -> None:
        """Raise UNAVAILABLE while the file cannot be written."""
        if self.state != "ok":
            raise KVError(
                ErrorKind.UNAVAILABLE,
                f"the append-only file {self.path} cannot be written ({self.error}); writes are refused "
                + ("until the node restarts" if self._fatal else "until it can be written again (retrying)"),
            )

    def must_wait(self, revision: int) -> bool:
        """Whether a write at `revision` must await acknowledged() before it
        is acknowledged: always with fsync "always", else while the writer is
        more than FLUX_AOF_BUFFER_BYTES behind."""
        if self.fsync_policy == "always":
            return revision > self._durable_rev
        return self._appended_bytes - self._taken_bytes > self._buffer_bytes and revision > self._written_rev

    async def acknowledged(self, revision: int) -> None:
        """Return once the write at `revision` may be acknowledged (see must_wait)."""
        if self.fsync_policy == "always":
            waiter = self._durable_waiters.add(revision)
        else:
            self.writes_delayed += 1
            waiter = self._written_waiters.add(revision)
        self._wants_progress = True
        self._wake.set()
        await waiter

    @property
    def last_revision(self) -> int:
        """The revision of the last change appended (or replayed)."""
        return self._last_appended

    def on_progress(self, listener: Callable[[], None]) -> None:
        """Call `listener` (on the event loop) when cdc_safe_revision has grown
        after want_progress()."""
        self._listeners.append(listener)

    def want_progress(self) -> None:
        """Ask for a progress report once cdc_safe_revision has grown (the CDC
        publisher waits for that)."""
        if self._cdc_wants_past != self.cdc_safe_revision:
            self._cdc_wants_past = self.cdc_safe_revision
            self._wake.set()

    # -- the CDC publisher's side -------------------------------------------------

    def cdc_confirmed(self, revision: int) -> None:
        """The broker confirmed every change up to `revision`: checkpoint it (soon)."""
        self._cdc_confirmed = revision
        if not self._wake.is_set():
            self._wake.set()

    def read_changes(self, after: int, until: int, max_bytes: int) -> list[ChangeRecord]:
        """The change records after revision `after` up to `until` (at most
        about max_bytes of keys and values), read from the file. Blocking:
        call it in a thread."""
        with self._io_lock:
            generation, end, tail = self._generation, self._offset, self._tail_offset
            f = open(self.path, "rb")  # the file of this generation, even if a rewrite replaces it next
        cursor_generation, cursor_offset, cursor_revision = self._read_cursor
        start = cursor_offset if cursor_generation == generation and cursor_revision <= after else tail
        records: list[ChangeRecord] = []
        size = 0
        offset = start
        with f:
            for record_offset, record_size, record in self._written_records(f, start, end):
                if not isinstance(record, ChangeRecord) or record.revision <= after:
                    offset = record_offset + record_size
                    continue
                if record.revision > until or size >= max_bytes:
                    break
                records.append(record)
                size += record_bytes(record)
                offset = record_offset + record_size
        self._read_cursor = (generation, offset, records[-1].revision if records else after)
        return records

    def _written_records(
        self, f: BinaryIO, start: int, end: int
    ) -> Iterator[tuple[int, int, ChangeRecord | Snapshot | Header]]:
        """The records of f[start:end], all written by this writer: a torn one is corruption."""
        for item in aof_format.read_records(f, self.path, start, end):
            if isinstance(item, Torn):
                raise AofCorrupt(self.path, item.offset, f"a written record reads as torn: {item.reason}")
            yield item

    # -- shutdown -------------------------------------------------------------------

    async def sync(self) -> None:
        """Write and fsync everything appended so far, whatever the policy."""
        if self._thread is None or self._fatal:
            return
        self._sync_until = max(self._sync_until, self._last_appended)
        waiter = self._durable_waiters.add(self._last_appended)
        self._wants_progress = True
        self._wake.set()
        await waiter

    async def close(self) -> None:
        """Stop any rewrite, write and fsync the rest, checkpoint, close."""
        self._rewrite_abort = True
        if self._rewrite_thread is not None:
            await asyncio.to_thread(self._rewrite_thread.join)
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self.cdc_enabled and self._cdc_confirmed != self.cdc_checkpoint and not self._fatal:
            await asyncio.to_thread(self._write_checkpoint, self._cdc_confirmed)
        with self._io_lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # -- status -------------------------------------------------------------------

    def counters(self) -> AofCounters:
        return AofCounters(
            path=self.path,
            fsync_policy=self.fsync_policy,
            state=self.state,
            size_bytes=self._offset,
            base_size_bytes=self._base_size,
            written_revision=self._written_rev,
            durable_revision=self._durable_rev,
            records_written=self.records_written,
            batches_written=self.batches_written,
            fsyncs=self.fsyncs,
            writes_delayed=self.writes_delayed,
            rewrites=self.rewrites,
            rewrite_in_progress=self._rewrite_thread is not None,
            last_rewrite_seconds=self.last_rewrite_seconds,
            cdc_checkpoint_revision=self.cdc_checkpoint,
            error=self.error,
        )

    def collect(self) -> list[Family]:
        """The file's metrics, for the node's registry."""
        c = self.counters()
        return [
            states(
                "fluxkv_aof_state",
                "The append-only file: ok, failing (writes refused, retried) or failed (writes refused until restart).",
                c.state,
                ("ok", "failing", "failed"),
            ),
            gauge("fluxkv_aof_size_bytes", "Size of the append-only file.", c.size_bytes),
            gauge("fluxkv_aof_base_size_bytes", "Its size after the last rewrite (or at start).", c.base_size_bytes),
            gauge(
                "fluxkv_aof_written_revision",
                "Every change up to this revision is written to the file.",
                c.written_revision,
            ),
            gauge("fluxkv_aof_durable_revision", "Every change up to this revision is fsynced.", c.durable_revision),
            counter("fluxkv_aof_records_written_total", "Change records written.", c.records_written),
            counter("fluxkv_aof_batches_written_total", "Batches written, one write() each.", c.batches_written),
            counter("fluxkv_aof_fsyncs_total", "fsyncs of the file.", c.fsyncs),
            counter(
                "fluxkv_aof_writes_delayed_total",
                "Writes that waited for the writer to catch up (FLUX_AOF_BUFFER_BYTES).",
                c.writes_delayed,
            ),
            counter("fluxkv_aof_rewrites_total", "Rewrites completed.", c.rewrites),
            gauge("fluxkv_aof_rewrite_in_progress", "1 while a rewrite runs.", int(c.rewrite_in_progress)),
            gauge("fluxkv_aof_last_rewrite_seconds", "How long the last rewrite took.", c.last_rewrite_seconds),
        ]

    def describe(self) -> str:
        c = self.counters()
        text = (
            f"{self.path}, fsync {c.fsync_policy}; {c.size_bytes} bytes ({c.base_size_bytes} after the last "
            f"rewrite); written up to revision {c.written_revision}, durable up to {c.durable_revision}; "
            f"{c.rewrites} rewrites" + (", one in progress" if c.rewrite_in_progress else "")
        )
        if self.cdc_enabled:
            text += f"; CDC checkpoint at revision {c.cdc_checkpoint_revision}"
        return text + (f"; error: {c.error}" if c.error else "")

    # -- the writer thread ---------------------------------------------------------

    def _writer(self) -> None:
        try:
            self._write_loop()
        except BaseException as exc:  # a bug: refuse writes rather than lose them silently
            log.exception("the append-only file's writer stopped")
            self.state, self.error, self._fatal = "failed", f"the writer stopped: {exc!r}", True
            self._notify()

    def _write_loop(self) -> None:
        last_sync = time.monotonic()
        while True:
            timeout: float | None = None
            now = time.monotonic()
            if self.state != "ok" and not self._fatal:
                timeout = RETRY_INTERVAL_S
            elif self.fsync_policy == "everysec" and self._durable_rev < self._written_rev:
                timeout = max(0.0, last_sync + 1.0 - now)
            if self._cdc_confirmed != self.cdc_checkpoint:
                wait = max(0.0, self._checkpoint_written_at + CHECKPOINT_INTERVAL_S - now)
                timeout = wait if timeout is None else min(timeout, wait)
            self._wake.wait(timeout)
            if (
                self.fsync_policy != "always"
                and not self._closing
                and not self._wants_progress
                and self._sync_until <= self._durable_rev
            ):
                time.sleep(WRITE_LINGER_S)
            self._wake.clear()
            closing = self._closing
            if self._fatal:
                if closing:
                    return
                continue
            wrote = self._write_pending()
            now = time.monotonic()
            if self._durable_rev < self._written_rev and (
                self.fsync_policy == "always"
                or (self.fsync_policy == "everysec" and now - last_sync >= 1.0)
                or self._sync_until > self._durable_rev
                or closing
            ):
                self._fsync()
                last_sync = now
            safe = self._written_rev if self.fsync_policy == "no" else self._durable_rev
            if self._wants_progress or 0 <= self._cdc_wants_past < safe:
                self._notify()
            if self.cdc_enabled and self._cdc_confirmed != self.cdc_checkpoint and not self._fatal:
                if closing or now - self._checkpoint_written_at >= CHECKPOINT_INTERVAL_S:
                    self._write_checkpoint(self._cdc_confirmed)
            if wrote and self._rewrite_due():
                self._start_rewrite_thread()
            if closing and self._retry_data:
                log.error(
                    "closing the append-only file %s with %d bytes of changes it could not write (%s): they are lost",
                    self.path,
                    len(self._retry_data),
                    self.error,
                )
                return
            if closing and not self._pending:
                return

    def _write_pending(self) -> bool:
        pending = self._pending
        n = len(pending)
        if not n and not self._retry_data:
            return False
        records = [pending.popleft() for _ in range(n)]
        encode = aof_format.encode_change
        data = self._retry_data + b"".join([encode(r) for r in records])
        last = records[-1].revision if records else self._retry_rev
        self._taken_bytes += sum(map(record_bytes, records))
        with self._io_lock:
            try:
                _write_all(self._fd, data)
            except OSError as exc:
                try:  # leave no partial record behind for the next attempt
                    os.ftruncate(self._fd, self._offset)
                except OSError:
                    pass
                self._retry_data, self._retry_rev = data, last
                self._set_error(exc, fatal=False)
                return False
            self._offset += len(data)
            self._written_rev = last
        self._retry_data = b""
        self.records_written += n
        self.batches_written += 1
        if self.state != "ok":
            log.warning("the append-only file %s can be written again; writes are accepted", self.path)
            self.state, self.error = "ok", ""
        return True

    def _fsync(self) -> None:
        with self._io_lock:
            written = self._written_rev
            try:
                os.fsync(self._fd)
            except OSError as exc:
                # After a failed fsync the kernel may have dropped the dirty
                # pages: nothing written since the last good fsync is known to
                # be on disk, and trying again can wrongly succeed.
                self._set_error(exc, fatal=True)
                return
        self.fsyncs += 1
        self._durable_rev = written

    def _set_error(self, exc: OSError, fatal: bool) -> None:
        error = f"{type(exc).__name__}: {exc}"
        if error != self.error or fatal:
            log.error(
                "cannot %s the append-only file %s (%s); writes are refused %s",
                "fsync" if fatal else "write",
                self.path,
                error,
                "until the node restarts" if fatal else "until it can be written again",
            )
        self.state, self.error = ("failed" if fatal else "failing"), error
        self._fatal = self._fatal or fatal
        self._notify()

    def _notify(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._progress)

    def _progress(self) -> None:
        """On the event loop: publish the writer's progress (as it is now)."""
        self._wants_progress = False
        self._cdc_wants_past = -1
        written, durable = self._written_rev, self._durable_rev
        self.cdc_safe_revision = written if self.fsync_policy == "no" else durable
        if self.state != "ok":
            failure = KVError(
                ErrorKind.UNAVAILABLE,
                f"the write was applied in memory, but the append-only file {self.path} cannot be written "
                f"({self.error}), so it is not durable; writes are refused until the file can be written",
            )
            self._durable_waiters.fail(failure)
            self._written_waiters.fail(failure)
        self._durable_waiters.reached(durable)
        self._written_waiters.reached(written)
        if self._durable_waiters or self._written_waiters:
            self._wants_progress = True  # the writer reports again once it moves on
        for listener in self._listeners:
            listener()

    # -- the CDC checkpoint -------------------------------------------------------

    def _read_checkpoint(self) -> int | None:
        try:
            data = orjson.loads(Path(self.checkpoint_path).read_bytes())
        except FileNotFoundError:
            return None
        except (orjson.JSONDecodeError, OSError) as exc:
            log.warning("ignoring the CDC checkpoint %s (%s)", self.checkpoint_path, exc)
            return None
        if not isinstance(data, dict) or data.get("epoch") != self.store.epoch:
            log.warning("ignoring the CDC checkpoint %s: it belongs to another epoch", self.checkpoint_path)
            return None
        revision = data.get("confirmed_revision")
        return revision if isinstance(revision, int) and revision >= 0 else None

    def _write_checkpoint(self, revision: int) -> None:
        """Atomically replace the checkpoint file (a crash leaves the old or the new one)."""
        data = orjson.dumps({"epoch": self.store.epoch, "confirmed_revision": revision}) + b"\n"
        try:
            aof_format.replace_file(self.checkpoint_path, data)
        except OSError as exc:
            log.error("cannot write the CDC checkpoint %s (%s); trying again later", self.checkpoint_path, exc)
            return
        finally:
            self._checkpoint_written_at = time.monotonic()
        self.cdc_checkpoint = revision

    # -- rewrites (aof_rewrite does the work) --------------------------------------

    def _rewrite_due(self) -> bool:
        if self._rewrite_thread is not None or not self._rewrite_percent or self._closing:
            return False
        return self._offset >= self._rewrite_min and self._offset * 100 >= self._base_size * (
            100 + self._rewrite_percent
        )

    def request_rewrite(self) -> asyncio.Future[None]:
        """Start a rewrite now (or join the one running); the future completes when it has."""
        if self._rewrite_thread is None:
            self._start_rewrite_thread()
        assert self._rewrite_done is not None
        return self._rewrite_done

    def _start_rewrite_thread(self) -> None:
        """Called on the event loop (request_rewrite) or the writer thread."""
        loop = self._loop
        assert loop is not None
        with self._io_lock:
            if self._rewrite_thread is not None:
                return
            # Created on the event loop or the writer thread: bound to the loop either way.
            self._rewrite_done = asyncio.Future(loop=loop)
            self._rewrite_thread = threading.Thread(target=self._run_rewrite, name="fluxkv-aof-rewrite", daemon=True)
        self._rewrite_thread.start()

    def _run_rewrite(self) -> None:
        started = time.monotonic()
        error: BaseException | None = None
        try:
            for step in aof_rewrite.steps(self):
                if self._rewrite_abort and aof_rewrite.abortable(step):
                    raise aof_rewrite.Aborted
        except aof_rewrite.Aborted:
            error = KVError(ErrorKind.UNAVAILABLE, "the rewrite was stopped: the node is shutting down")
        except (OSError, AofCorrupt) as exc:
            log.error("rewriting the append-only file %s failed (%s); it stays as it was", self.path, exc)
            error = KVError(ErrorKind.UNAVAILABLE, f"rewriting the append-only file failed: {exc}")
            self._base_size = self._offset  # no automatic retry until it has grown again
        finally:
            _remove_if_present(self.path + ".rewrite")
        if error is None:
            self.rewrites += 1
            self.last_rewrite_seconds = time.monotonic() - started
            log.info(
                "rewrote the append-only file %s in %.2f s: %d bytes now",
                self.path,
                self.last_rewrite_seconds,
                self._offset,
            )
        done = self._rewrite_done
        with self._io_lock:
            self._rewrite_thread = None
        loop = self._loop
        if done is not None and loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(_settle, done, error)

    # Called by aof_rewrite, on the rewrite thread.

    def rewrite_begin(self) -> tuple[int, int]:
        """(base revision, offset of the first change after it): the changes
        the new file must carry after its snapshot.
        With CDC, that is everything after the checkpoint, which a restart
        would publish from."""
        with self._io_lock:
            written, end, tail = self._written_rev, self._offset, self._tail_offset
        if not self.cdc_enabled or self.cdc_checkpoint >= written:
            return written, end
        base = self.cdc_checkpoint
        start = end
        with open(self.path, "rb") as f:
            for offset, _, record in self._written_records(f, tail, end):
                if isinstance(record, ChangeRecord) and record.revision > base:
                    start = offset
                    break
        return base, start

    def end_offset(self) -> int:
        return self._offset

    def rewrite_switch(self, new_fd: int, new_size: int, tail_offset: int) -> None:
        """The rewritten file is in place (and synced, with the directory):
        append to it from now on. The caller holds _io_lock."""
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = new_fd
        self._offset = self._base_size = new_size
        self._tail_offset = tail_offset
        self._generation += 1
        self._durable_rev = self._written_rev

    def rename_not_durable(self, exc: OSError) -> None:
        """The directory holding the renamed file could not be fsynced: a
        machine crash could bring the old file back, without what is written
        from now on. Refuse writes until a restart."""
        self._set_error(exc, fatal=True)

    @property
    def io_lock(self) -> threading.Lock:
        return self._io_lock


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
        future.exception()  # a rewrite nobody awaits must not log "never retrieved"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _remove_if_present(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
