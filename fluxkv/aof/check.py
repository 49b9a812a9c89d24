"""`fluxkv aof-check` and `fluxkv aof-repair`, offline: how much of a file is
good, and cutting it after its last good record (the original kept aside)."""

from __future__ import annotations

import os
from typing import NamedTuple

from fluxkv import durable_files
from fluxkv.aof.file_format import AofCorrupt, Header, Snapshot, Torn, read_records

COPY_CHUNK = 1 << 20


class CheckResult(NamedTuple):
    records: int
    epoch: str
    last_revision: int
    # Bytes up to the end of the last good record.
    good_size: int
    size: int
    # What is wrong after good_size (None: nothing), and whether a node would
    # cut it off at start-up by itself (a torn last record) or refuse to start.
    problem: str | None
    torn: bool


def check(path: str) -> CheckResult:
    """Read the whole file and say how much of it is good."""
    records = last = 0
    epoch = ""
    good = 0
    problem: str | None = None
    torn = False
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            for item in read_records(f, path):
                if isinstance(item, Torn):
                    problem, torn = f"torn last record at byte offset {item.offset}: {item.reason}", True
                    break
                offset, length, record = item
                records += 1
                good = offset + length
                if isinstance(record, Header):
                    epoch = record.epoch
                    last = max(last, record.base_revision)
                elif isinstance(record, Snapshot):
                    last = max(last, record.mod_revision)
                else:
                    last = max(last, record.revision)
        except AofCorrupt as exc:
            problem = str(exc)
    return CheckResult(records, epoch, last, good, size, problem, torn)


def repair(path: str) -> tuple[CheckResult, str | None]:
    """Cut the file after its last good record, keeping the original as
    <path>.before-repair; returns the check and the copy's path (None when
    there was nothing to cut)."""
    result = check(path)
    if result.problem is None:
        return result, None
    backup = path + ".before-repair"
    with open(path, "rb") as src, open(backup, "wb") as dst:
        while chunk := src.read(COPY_CHUNK):
            dst.write(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    os.truncate(path, result.good_size)
    durable_files.fsync_file(path)
    return result, backup
