"""Files that a crash leaves whole: fsync a file or the directory that holds
it, and replace a file atomically. The append-only file and CDC's checkpoint
use them."""

from __future__ import annotations

import os


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: str, data: bytes) -> None:
    """Put `data` at `path` atomically and durably: a crash leaves the old
    file or the new one (a temporary file, fsynced, renamed over `path`, and
    the directory fsynced)."""
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    fsync_dir(path)


def fsync_dir(path: str) -> None:
    """Make a rename or a new file in `path`'s directory durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
