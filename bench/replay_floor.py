#!/usr/bin/env python3
"""The floor of a replay in Python: the least per-record work any replay of the
append-only file must do (a record's frame, its CRC-32, its fields, the key's
str, the value's bytes with its revision packed behind, a shard dict's store),
in one fused loop over an in-memory file of SET records, with no other check,
no file reads, no generator and no function call per record. What replay.py
does costs this plus its checks and its structure (bench/README.md: issue 14).

    .venv/bin/python bench/replay_floor.py [--records 1000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import struct
import time
import zlib

FRAME = struct.Struct("<IIB")  # length, crc, kind: fluxkv/aof/file_format.py's framing
SET = struct.Struct("<BQQQI")  # kind, revision, ts_ms, expires_at_ms, key length
LENGTH_CRC = struct.Struct("<II")
REVISION = struct.Struct("<Q")


def set_records(count: int, value_size: int) -> bytes:
    value = os.urandom(value_size)
    parts = []
    for i in range(count):
        key = f"key:{i:012d}".encode()
        payload = SET.pack(2, i + 1, 0, 0, len(key)) + key + value
        parts.append(LENGTH_CRC.pack(len(payload), zlib.crc32(payload)) + payload)
    return b"".join(parts)


def fused_load(data: bytes) -> list[dict[str, bytes]]:
    shards: list[dict[str, bytes]] = [{} for _ in range(256)]
    view, pos, size = memoryview(data), 0, len(data)
    unpack_frame, unpack_set, crc32, pack_revision = FRAME.unpack_from, SET.unpack_from, zlib.crc32, REVISION.pack
    while pos < size:
        length, crc, _ = unpack_frame(view, pos)
        end = pos + 8 + length
        if crc32(view[pos + 8 : end]) != crc:
            raise ValueError(f"checksum mismatch at {pos}")
        _, revision, _, _, key_length = unpack_set(view, pos + 8)
        key_start = pos + 8 + SET.size
        key = view[key_start : key_start + key_length]
        shards[crc32(key) & 0xFF][str(key, "utf-8")] = bytes(view[key_start + key_length : end]) + pack_revision(
            revision
        )
        pos = end
    return shards


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--records", type=int, default=1_000_000, help="SET records of 16-byte keys (default 1000000)")
    p.add_argument("--value-size", type=int, default=100, help="bytes per value (default 100)")
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = p.parse_args()
    data = set_records(args.records, args.value_size)
    print(f"{args.records} SET records of {args.value_size} B values, {len(data) / 2**20:.0f} MiB in memory")
    for r in range(1, args.rounds + 1):
        started = time.process_time()
        fused_load(data)
        seconds = time.process_time() - started
        print(
            f"round {r}: {args.records / seconds:,.0f} records/s, {seconds / args.records * 1e6:.2f} µs of CPU a record"
        )
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
