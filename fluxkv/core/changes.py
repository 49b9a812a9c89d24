"""Change records: what the store emits for every mutation, in revision order.

A sink is anything with `append(record)`. The store calls it inside the
mutation's critical section, so a sink sees records in exactly the order they
were applied. `append` must be quick, must not block and must not raise:
buffer the record and do any I/O elsewhere.
"""

from __future__ import annotations

import enum
from typing import NamedTuple, Protocol


class Op(enum.StrEnum):
    SET = "set"
    DELETE = "del"
    EXPIRE = "expire"


class ChangeRecord(NamedTuple):
    revision: int
    op: Op
    key: str
    # The new value for SET; None for DELETE and EXPIRE.
    value: bytes | None
    # Absolute expiry in Unix milliseconds; 0 when the key has no TTL.
    expires_at_ms: int
    # When the change was applied, in Unix milliseconds.
    ts_ms: int
    shard: int


def text_bytes(text: str) -> int:
    """The length of `text` in UTF-8 (an ASCII string's is its length: no encoding needed)."""
    return len(text) if text.isascii() else len(text.encode())


def change_bytes(key: str, value: bytes | None) -> int:
    """What a change weighs wherever changes are counted: the admission of a write,
    the CDC queue (FLUX_CDC_QUEUE_BYTES), the append-only file's buffer
    (FLUX_AOF_BUFFER_BYTES) and the watch history (FLUX_WATCH_HISTORY_BYTES):
    the UTF-8 bytes of its key and the bytes of its value."""
    return text_bytes(key) + (len(value) if value is not None else 0)


def record_bytes(record: ChangeRecord) -> int:
    """change_bytes(record.key, record.value), in one call: every sink counts every change."""
    key, value = record.key, record.value
    return (len(key) if key.isascii() else len(key.encode())) + (len(value) if value is not None else 0)


class ChangeSink(Protocol):
    def append(self, record: ChangeRecord) -> None: ...
