"""Start-up: load an append-only file into an empty store, cutting off a
torn last record (a write a crash interrupted); a file corrupt before its
last record is refused (AofCorrupt), for `fluxkv aof-repair` to cut."""

from __future__ import annotations

import logging
import os
import time
from typing import NamedTuple

from fluxkv import durable_files
from fluxkv.aof import file_format as aof_format
from fluxkv.aof.file_format import AofCorrupt, Header, Snapshot, Torn
from fluxkv.core.changes import ChangeRecord, Op
from fluxkv.core.store import Store, wall_clock_ms

log = logging.getLogger("fluxkv.aof")
_SET = Op.SET


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
                rev, op, key, value, expires_at, _, _ = record
                if header is None or rev <= last_change:
                    raise AofCorrupt(path, offset, f"revision {rev} follows {last_change}: out of order")
                if last_change == 0:
                    tail_offset = offset
                last_change = rev
                if op is _SET and not (expires_at and expires_at <= now):
                    assert value is not None
                    load(key, value, rev, expires_at)
                else:
                    unload(key)
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
        durable_files.fsync_file(path)
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
