"""CDC's offset in the change log: the revision up to which the broker
confirmed every change, kept in a file so that a restarted node publishes the
changes after it (docs/cdc.md, delivery contract).

The file is `<FLUX_AOF_FILENAME>.cdc-checkpoint`, JSON
`{"epoch": ..., "confirmed_revision": ...}`, replaced atomically (a temporary
file, fsynced, renamed over it, the directory fsynced), so a crash leaves the
old checkpoint or the new one. Its methods block: the publisher calls them in
a thread (asyncio.to_thread), at start-up, at most once every
CHECKPOINT_INTERVAL_S while the broker confirms, and at shutdown.
"""

from __future__ import annotations

import logging
import threading

import orjson

from fluxkv import durable_files

log = logging.getLogger("fluxkv.cdc")

# The checkpoint file is rewritten at most this often (and at shutdown).
CHECKPOINT_INTERVAL_S = 1.0


class Checkpoint:
    def __init__(self, path: str) -> None:
        self.path = path
        self.revision = 0  # what the file holds
        self._epoch = ""
        # A save cut short by a cancelled task may still run when the next
        # one starts: they take turns, and the file's revision only grows.
        self._lock = threading.Lock()

    def load(self, epoch: str, end: int) -> int:
        """The checkpoint of `epoch` in a log that ends at revision `end`.
        With none (CDC was off, the file is new, or it belongs to another
        epoch) or one beyond `end`, publish from `end` on, and say so
        durably before anything else."""
        self._epoch = epoch
        revision = self._read()
        if revision is None or revision > end:
            self._write(end)
            return end
        self.revision = revision
        return revision

    def save(self, revision: int) -> None:
        """Checkpoint `revision` (confirmed by the broker) if it is past what
        the file holds; on an error, log it and keep the file as it was."""
        with self._lock:
            if revision > self.revision:
                self._write(revision)

    def _read(self) -> int | None:
        try:
            with open(self.path, "rb") as f:
                data = orjson.loads(f.read())
        except FileNotFoundError:
            return None
        except (orjson.JSONDecodeError, OSError) as exc:
            log.warning("ignoring the CDC checkpoint %s (%s)", self.path, exc)
            return None
        if not isinstance(data, dict) or data.get("epoch") != self._epoch:
            log.warning("ignoring the CDC checkpoint %s: it belongs to another epoch", self.path)
            return None
        revision = data.get("confirmed_revision")
        return revision if isinstance(revision, int) and revision >= 0 else None

    def _write(self, revision: int) -> None:
        data = orjson.dumps({"epoch": self._epoch, "confirmed_revision": revision}) + b"\n"
        try:
            durable_files.replace_file(self.path, data)
        except OSError as exc:
            log.error("cannot write the CDC checkpoint %s (%s); trying again later", self.path, exc)
            return
        self.revision = revision
