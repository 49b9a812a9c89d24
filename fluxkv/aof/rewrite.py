"""Rewriting (compacting) the append-only file without stopping the node.

The new file is written beside the old one (<path>.rewrite): a header, then
the live keys shard by shard (each shard copied under its own lock, so no
pause is longer than one shard's copy; between shards the rewrite rests as
long as the shard took, as encoding holds the GIL), then the change records the old file
gained since the rewrite began, copied as bytes. The last of those is copied
under the writer's lock; the new file is fsynced and renamed over the old one,
the writer appends to the new file from then on, and the directory is fsynced
before the lock is released (so no write is acknowledged before the rename is
durable).

Replaying the result gives the same keys as replaying the old file: every key
in the snapshot holds its state at some moment after the base revision, and
every change after the base revision follows, in order, so each key ends at
its last change. Until the rename the old file is untouched; after it the new
file holds everything the old one did. A crash at any step leaves a file that
replays correctly, and a leftover <path>.rewrite is removed at start-up.

steps() yields after each step, so that a test can stop a process at any one;
the node stops a rewrite at shutdown only at a step before the commit.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from typing import BinaryIO, Protocol

from fluxkv import durable_files
from fluxkv.aof import file_format as aof_format
from fluxkv.aof.file_format import Header, Snapshot
from fluxkv.core.store import NUM_SHARDS, Store, wall_clock_ms

# Copy the old file's new changes without the lock while more than this many
# bytes remain; the rest is copied under it.
_CATCH_UP_BYTES = 1 << 20
_COPY_CHUNK = 1 << 20
_WRITE_BATCH = 1 << 20
_MAX_REST_S = 0.05


class Aborted(Exception):
    """The node is shutting down: the rewrite stops and its file is removed."""


class RewrittenFile(Protocol):
    """What a rewrite needs of the append-only file it replaces (fluxkv.aof.file.AppendOnlyFile)."""

    path: str
    store: Store

    @property
    def io_lock(self) -> threading.Lock:
        """Held by the file's writer while it writes; the rewrite's last copy holds it too."""
        ...

    def rewrite_begin(self) -> tuple[int, int]:
        """(base revision, offset of the first change after it in the file)."""
        ...

    def end_offset(self) -> int:
        """The file's size as its writer has written it."""
        ...

    def rewrite_switch(self, new_fd: int, new_size: int, tail_offset: int) -> None:
        """Append to the renamed new file from now on (io_lock held)."""
        ...

    def rename_not_durable(self, exc: OSError) -> None:
        """The directory could not be fsynced after the rename."""
        ...


def steps(aof: RewrittenFile) -> Iterator[str]:
    temporary = aof.path + ".rewrite"
    base, copy_from = aof.rewrite_begin()
    # Only a rewrite replaces the file, and this is the only one running: the
    # path names the same file as when rewrite_begin() read its offsets.
    with open(aof.path, "rb") as old, open(temporary, "wb") as new:
        new.write(aof_format.encode_header(Header(aof.store.epoch, base, wall_clock_ms())))
        yield "header"
        for index in range(NUM_SHARDS):
            started = time.perf_counter()
            parts: list[bytes] = []
            size = 0
            for key, entry in aof.store.shard_entries(index):
                data = aof_format.encode_snapshot(Snapshot(key, entry.value, entry.mod_revision, entry.expires_at_ms))
                parts.append(data)
                size += len(data)
                if size >= _WRITE_BATCH:
                    new.write(b"".join(parts))
                    parts.clear()
                    size = 0
            new.write(b"".join(parts))
            # Encoding holds the GIL: rest as long as this shard took, so
            # that the event loop gets at least half of the time.
            time.sleep(min(time.perf_counter() - started, _MAX_REST_S))
            yield f"shard {index}"
        tail_offset = new.tell()
        while aof.end_offset() - copy_from > _CATCH_UP_BYTES:
            copy_from = _copy(old, new, copy_from, aof.end_offset())
            yield "catch-up"
        with aof.io_lock:
            _copy(old, new, copy_from, aof.end_offset())
            new.flush()
            os.fsync(new.fileno())
            yield "synced"
            fd = os.open(temporary, os.O_WRONLY | os.O_APPEND)
            try:
                os.replace(temporary, aof.path)
            except OSError:
                os.close(fd)
                raise
            # The path names the new file now: the writer appends to it from
            # here on, whatever happens next.
            aof.rewrite_switch(fd, new.tell(), tail_offset)
            yield "renamed"
            try:
                durable_files.fsync_dir(aof.path)
            except OSError as exc:
                aof.rename_not_durable(exc)
                raise
            yield "directory synced"


def abortable(step: str) -> bool:
    """Whether a rewrite may stop after `step` (not once it commits the new file)."""
    return step in ("header", "catch-up") or step.startswith("shard ")


def _copy(old: BinaryIO, new: BinaryIO, start: int, end: int) -> int:
    """Append old[start:end] to new; return end."""
    old.seek(start)
    left = end - start
    while left > 0:
        chunk = old.read(min(_COPY_CHUNK, left))
        if not chunk:
            raise OSError(f"the append-only file ended at {end - left} bytes, before {end}")
        new.write(chunk)
        left -= len(chunk)
    return end
