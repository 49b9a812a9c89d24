"""The append-only file's format: a magic string, then framed records.

    file   := MAGIC record*
    record := length u32 | crc u32 | kind u8 | body      (little-endian)

`length` counts kind and body; `crc` is CRC-32 (zlib.crc32) of kind and body,
so a torn or flipped byte anywhere in a record is detected. The first record
is a HEADER; change records follow in revision order. A rewritten file holds a
HEADER, SNAPSHOT records (the live keys when it was written) and then the
change records made meanwhile. docs/aof.md describes the format.
"""

from __future__ import annotations

import enum
import os
import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO, NamedTuple

from fluxkv.core.changes import ChangeRecord, Op

MAGIC = b"FLUXAOF\x01"  # the last byte is the format's version
FRAME = struct.Struct("<IIB")  # length, crc, kind
_HEADER = struct.Struct("<QQ")  # base revision, created (Unix ms); then the epoch (UTF-8)
_SET = struct.Struct("<QQQI")  # revision, ts_ms, expires_at_ms, key length; then key, value
_REMOVE = struct.Struct("<QQ")  # revision, ts_ms; then the key
_SNAPSHOT = struct.Struct("<QQI")  # mod_revision, expires_at_ms, key length; then key, value
# The largest record the reader accepts: bigger than any value a node can be
# configured to take through gRPC (2 GiB), so a wild length is corruption.
MAX_RECORD = 2**31 + 2**20
_READ_CHUNK = 1 << 20


class Kind(enum.IntEnum):
    HEADER = 1
    SET = 2
    DELETE = 3
    EXPIRE = 4
    SNAPSHOT = 5


class Header(NamedTuple):
    epoch: str
    # Revisions up to this one are in the snapshot that follows (0: none).
    base_revision: int
    created_ms: int


class Snapshot(NamedTuple):
    """A live key as a rewrite found it."""

    key: str
    value: bytes
    mod_revision: int
    expires_at_ms: int


class AofCorrupt(Exception):
    """The file cannot be read past `offset`; the message says why."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


# Plain ints and module constants for the per-record work: looking up an Enum
# member costs about 0.2 µs on Python 3.11.
_KIND_SET, _KIND_DELETE, _KIND_EXPIRE, _KIND_SNAPSHOT, _KIND_HEADER = (
    int(k) for k in (Kind.SET, Kind.DELETE, Kind.EXPIRE, Kind.SNAPSHOT, Kind.HEADER)
)
_SET_SIZE, _REMOVE_SIZE, _SNAPSHOT_SIZE = _SET.size, _REMOVE.size, _SNAPSHOT.size
_new_tuple = tuple.__new__  # half the cost of a NamedTuple's own __new__, per record
_OP_SET, _OP_DELETE, _OP_EXPIRE = Op.SET, Op.DELETE, Op.EXPIRE


def _frame(kind: Kind, body: bytes) -> bytes:
    payload = bytes((kind,)) + body
    return struct.pack("<II", len(payload), zlib.crc32(payload)) + payload


def encode_header(header: Header) -> bytes:
    return MAGIC + _frame(Kind.HEADER, _HEADER.pack(header.base_revision, header.created_ms) + header.epoch.encode())


# A change's kind byte and body header in one pack (the writer encodes every change).
_SET_PAYLOAD = struct.Struct("<BQQQI")  # Kind.SET, then _SET
_REMOVE_PAYLOAD = struct.Struct("<BQQ")  # Kind.DELETE or EXPIRE, then _REMOVE
_LENGTH_CRC = struct.Struct("<II")


def encode_change(record: ChangeRecord) -> bytes:
    revision, op, key, value, expires_at, ts_ms, _ = record
    kb = key.encode()
    if op is _OP_SET:
        assert value is not None
        payload = b"".join((_SET_PAYLOAD.pack(_KIND_SET, revision, ts_ms, expires_at, len(kb)), kb, value))
    else:
        kind = _KIND_DELETE if op is _OP_DELETE else _KIND_EXPIRE
        payload = _REMOVE_PAYLOAD.pack(kind, revision, ts_ms) + kb
    return _LENGTH_CRC.pack(len(payload), zlib.crc32(payload)) + payload


def encode_snapshot(entry: Snapshot) -> bytes:
    key = entry.key.encode()
    return _frame(Kind.SNAPSHOT, _SNAPSHOT.pack(entry.mod_revision, entry.expires_at_ms, len(key)) + key + entry.value)


def decode(kind: int, body: memoryview) -> ChangeRecord | Snapshot | Header:
    """One record's content (ValueError if it does not parse)."""
    if kind == _KIND_SET:
        revision, ts_ms, expires_at, key_len = _SET.unpack_from(body)
        end = _SET_SIZE + key_len
        if end > len(body):
            raise ValueError("key length past the record's end")
        key = body[_SET_SIZE:end]  # the shard is the CRC of these bytes
        record = (revision, _OP_SET, str(key, "utf-8"), bytes(body[end:]), expires_at, ts_ms, zlib.crc32(key) & 0xFF)
        return _new_tuple(ChangeRecord, record)
    if kind == _KIND_DELETE or kind == _KIND_EXPIRE:
        revision, ts_ms = _REMOVE.unpack_from(body)
        key = body[_REMOVE_SIZE:]
        op = _OP_DELETE if kind == _KIND_DELETE else _OP_EXPIRE
        return _new_tuple(ChangeRecord, (revision, op, str(key, "utf-8"), None, 0, ts_ms, zlib.crc32(key) & 0xFF))
    if kind == _KIND_SNAPSHOT:
        mod_revision, expires_at, key_len = _SNAPSHOT.unpack_from(body)
        end = _SNAPSHOT_SIZE + key_len
        if end > len(body):
            raise ValueError("key length past the record's end")
        return Snapshot(str(body[_SNAPSHOT_SIZE:end], "utf-8"), bytes(body[end:]), mod_revision, expires_at)
    if kind == _KIND_HEADER:
        base, created = _HEADER.unpack_from(body)
        return Header(str(body[_HEADER.size :], "utf-8"), base, created)
    raise ValueError(f"unknown record kind {kind}")


def _shard(key: str) -> int:
    return zlib.crc32(key.encode()) & 0xFF


class Torn(NamedTuple):
    """The file ends inside a record that starts at `offset` (a crash in the
    middle of a write): everything before it is good."""

    offset: int
    reason: str


def read_records(
    f: BinaryIO, path: str, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, int, ChangeRecord | Snapshot | Header] | Torn]:
    """Yield (offset, size, record) for each record of an open file, from `start`
    (a record boundary, or 0 for the file's beginning) up to `end` (default:
    the file's size), and a Torn last if the file ends in a torn record.

    A record that fails its checks but is the last thing in the file is torn:
    a write that a crash interrupted. Anything else that fails raises
    AofCorrupt with the offset of the first bad record.
    """
    size = os.fstat(f.fileno()).st_size if end is None else end
    offset = start
    if start == 0:
        f.seek(0)
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            if len(magic) < len(MAGIC) and MAGIC.startswith(magic):
                yield Torn(0, "the file ends inside its magic string")
                return
            raise AofCorrupt(path, 0, f"not a FluxKV append-only file (magic {magic!r}, expected {MAGIC!r})")
        offset = len(MAGIC)
    f.seek(offset)
    buf = memoryview(b"")
    pos = 0  # position of `offset` in buf
    # Locals: this loop runs once per record of a replay.
    frame_size, unpack_frame, crc32 = FRAME.size, FRAME.unpack_from, zlib.crc32
    while offset < size:
        if len(buf) - pos < frame_size:
            buf, pos = _refill(f, buf, pos, frame_size, size - offset)
            if len(buf) - pos < frame_size:
                yield Torn(offset, f"{len(buf) - pos} bytes where a record's {frame_size}-byte frame starts")
                return
        length, crc, kind = unpack_frame(buf, pos)
        total = 8 + length
        if length == 0 or length > MAX_RECORD:
            if offset + total >= size or _zeros_to_end(f, offset, size):
                yield Torn(offset, f"a record length of {length} at the end of the file")
                return
            raise AofCorrupt(path, offset, f"impossible record length {length}")
        if len(buf) - pos < total:
            buf, pos = _refill(f, buf, pos, total, size - offset)
            if len(buf) - pos < total:
                yield Torn(offset, f"a {total}-byte record with only {len(buf) - pos} bytes left in the file")
                return
        if crc32(buf[pos + 8 : pos + total]) != crc:
            if offset + total == size or _zeros_to_end(f, offset + total, size):
                yield Torn(offset, "the last record's checksum does not match")
                return
            raise AofCorrupt(path, offset, f"checksum mismatch in a {total}-byte record")
        try:
            record = decode(kind, buf[pos + 9 : pos + total])
        except (ValueError, struct.error, UnicodeDecodeError) as exc:
            raise AofCorrupt(path, offset, f"a record with a valid checksum does not parse: {exc}") from None
        yield offset, total, record
        offset += total
        pos += total


def _refill(f: BinaryIO, buf: memoryview, pos: int, need: int, left: int) -> tuple[memoryview, int]:
    """Keep buf[pos:] and read more, at least `need` bytes if the file has them."""
    rest = bytes(buf[pos:])
    want = max(need - len(rest), _READ_CHUNK)
    more = f.read(min(want, left - len(rest)))
    return memoryview(rest + more), 0


def _zeros_to_end(f: BinaryIO, offset: int, size: int) -> bool:
    """Whether the file holds only zero bytes from `offset` on: a file system
    may extend a file before the data of an interrupted write reaches it."""
    here = f.tell()
    try:
        f.seek(offset)
        while chunk := f.read(min(_READ_CHUNK, size - f.tell())):
            if chunk.count(0) != len(chunk):
                return False
        return True
    finally:
        f.seek(here)
