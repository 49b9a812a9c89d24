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


def record_bytes(record: ChangeRecord) -> int:
    """What a record counts against the bounds of the sinks that hold records
    (FLUX_CDC_QUEUE_BYTES, FLUX_AOF_BUFFER_BYTES): its key and value."""
    return len(record.key) + (len(record.value) if record.value is not None else 0)


class ChangeSink(Protocol):
    def append(self, record: ChangeRecord) -> None: ...
