"""Scan cursors: an opaque, URL-safe string that says where a scan resumes.

It carries a format version, the scan's random token (which names its key
snapshots on the node), the shard, the last key returned and a checksum of
the prefix, so that a cursor used with another prefix is refused.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import struct
import zlib

from fluxkv.core.errors import invalid, shown
from fluxkv.core.store import NUM_SHARDS, ScanPosition

_VERSION = 1
_HEAD = struct.Struct(">BQHIB")  # version, token, shard, crc32(prefix), has_after


def start() -> ScanPosition:
    return ScanPosition(secrets.randbits(64), 0, None)


def encode(position: ScanPosition, prefix: str) -> str:
    token, shard, after = position
    head = _HEAD.pack(_VERSION, token, shard, zlib.crc32(prefix.encode()), after is not None)
    raw = head + (after.encode() if after is not None else b"")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode(cursor: str, prefix: str) -> ScanPosition:
    """The position a cursor names; KVError(INVALID_ARGUMENT) if it is not one."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        version, token, shard, prefix_crc, has_after = _HEAD.unpack_from(raw)
        after = raw[_HEAD.size :].decode() if has_after else None
    except (binascii.Error, ValueError, struct.error):
        raise invalid(f"invalid cursor {shown(cursor)}: not a cursor returned by Scan") from None
    if version != _VERSION or shard >= NUM_SHARDS or has_after > 1 or (not has_after and raw[_HEAD.size :]):
        raise invalid(f"invalid cursor {shown(cursor)}: not a cursor returned by Scan")
    if prefix_crc != zlib.crc32(prefix.encode()):
        raise invalid(f"invalid cursor: it was returned by a scan with another prefix than {shown(prefix)}")
    return ScanPosition(token, shard, after)
