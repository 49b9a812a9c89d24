"""The append-only file on its own: format, replay, TTLs, a torn tail,
corruption and its repair, rewrites under writes and a crash at each step of
a rewrite (in a child process killed there)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxkv.aof import file_format as aof_format
from fluxkv.aof.file import AofSettings, AppendOnlyFile
from fluxkv.aof.file_format import AofCorrupt, Header, Snapshot, Torn
from fluxkv.aof.replay import replay
from fluxkv.core.changes import ChangeRecord, Op
from fluxkv.core.store import Store
from tests.conftest import ROOT

CLI = [sys.executable, str(ROOT / "cmd" / "fluxkv")]


@asynccontextmanager
async def open_aof(path: Path, fsync: str = "always", store: Store | None = None) -> AsyncIterator[AppendOnlyFile]:
    """A store (replayed from `path` if it exists) with its AOF writing."""
    aof = AppendOnlyFile(AofSettings(str(path), fsync, 1 << 40, 0, 64 << 20), store if store is not None else Store())
    aof.open()
    aof.store.attach_sink(aof)
    aof.start()
    try:
        yield aof
    finally:
        await aof.sync()
        await aof.close()


def contents(store: Store) -> dict[str, tuple[bytes, int, int]]:
    """Every live key: (value, mod_revision, absolute expiry)."""
    out = {}
    for index in range(256):
        for key, entry in store.shard_entries(index):
            out[key] = (entry.value, entry.mod_revision, entry.expires_at_ms)
    return out


def records(path: Path) -> list[tuple[int, int, object]]:
    with open(path, "rb") as f:
        items = list(aof_format.read_records(f, str(path)))
    assert not any(isinstance(i, Torn) for i in items)
    return items  # type: ignore[return-value]


keys = st.text(min_size=1, max_size=20)
revisions = st.integers(1, 2**63 - 1)
millis = st.integers(0, 2**63 - 1)


@st.composite
def change_records(draw: st.DrawFn) -> ChangeRecord:
    op = draw(st.sampled_from(list(Op)))
    key = draw(keys)
    value = draw(st.binary(max_size=300)) if op is Op.SET else None
    expires = draw(millis) if op is Op.SET else 0
    return ChangeRecord(draw(revisions), op, key, value, expires, draw(millis), aof_format._shard(key))


@settings(max_examples=100, deadline=None)
@given(st.lists(change_records(), max_size=20), keys, st.binary(max_size=50))
def test_every_record_reads_back_as_written(changes: list[ChangeRecord], key: str, value: bytes) -> None:
    header = Header("0123456789abcdef", 7, 1234)
    snapshot = Snapshot(key, value, 5, 99)
    data = aof_format.encode_header(header) + aof_format.encode_snapshot(snapshot)
    data += b"".join(aof_format.encode_change(c) for c in changes)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        read = list(aof_format.read_records(f, "test"))  # type: ignore[arg-type]
    assert [r[2] for r in read if not isinstance(r, Torn)] == [header, snapshot, *changes]


async def test_replay_restores_keys_revisions_expiry_and_epoch(tmp_path: Path) -> None:
    path = tmp_path / "node.aof"
    rng = random.Random(7)
    async with open_aof(path, "everysec") as aof:
        store = aof.store
        for _ in range(3000):
            key = f"k{rng.randrange(400)}"
            if rng.random() < 0.2:
                store.delete(key)
            else:
                store.set(key, rng.randbytes(rng.randrange(0, 200)), ttl_ms=rng.choice([0, 0, 3_600_000]))
    restored = Store()
    result = replay(str(path), restored)
    assert result is not None and result.torn is None
    assert contents(restored) == contents(store)
    assert (restored.revision, restored.epoch) == (store.revision, store.epoch)
    assert result.records == store.revision
    # And it goes on from there: the next write continues the revisions in the same epoch.
    async with open_aof(path, store=restored) as again:
        assert again.store.set("next", b"v").revision == store.revision + 1
    final = Store()
    replay(str(path), final)
    assert final.get("next") is not None and final.epoch == store.epoch


async def test_values_of_any_size_replay(tmp_path: Path) -> None:
    """Flux-KV's replay gave up on a record over 64 KiB."""
    path = tmp_path / "node.aof"
    big = random.Random(1).randbytes(5 << 20)
    async with open_aof(path) as aof:
        aof.store.set("big", big)
        aof.store.set("empty", b"")
        aof.store.set("ключ-🔑", b"unicode key")
    restored = Store()
    replay(str(path), restored)
    assert contents(restored) == contents(aof.store)
    assert restored.get("big").value == big  # type: ignore[union-attr]


async def test_ttl_keeps_its_absolute_deadline_and_expired_keys_stay_expired(tmp_path: Path) -> None:
    path = tmp_path / "node.aof"
    now = [1_000_000]
    async with open_aof(path, store=Store(clock=lambda: now[0])) as aof:
        aof.store.set("long", b"v", ttl_ms=10_000)
        aof.store.set("short", b"v", ttl_ms=2_000)
        aof.store.set("forever", b"v")
    later = [now[0] + 4_000]
    restored = Store(clock=lambda: later[0])
    replay(str(path), restored, now_ms=later[0])
    long = restored.get("long")
    assert long is not None and long.ttl_ms == 6_000
    assert restored.get("short") is None
    assert restored.get("forever") is not None and restored.get("forever").ttl_ms == 0  # type: ignore[union-attr]
    assert restored.revision == 3


async def test_a_torn_last_record_is_cut_off_with_one_warning_at_any_length(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "node.aof"
    async with open_aof(path) as aof:
        for i in range(20):
            aof.store.set(f"k{i}", b"x" * 40)
    whole = path.read_bytes()
    last_offset, last_size, _ = records(path)[-1]
    assert last_offset + last_size == len(whole)
    for cut in range(1, last_size):
        path.write_bytes(whole[: len(whole) - cut])
        caplog.clear()
        restored = Store()
        with caplog.at_level(logging.WARNING, logger="fluxkv.aof"):
            result = replay(str(path), restored)
        assert result is not None and result.torn is not None and result.torn.offset == last_offset
        assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
        assert f"torn last record at byte offset {last_offset}" in caplog.text
        assert len(restored) == 19 and restored.revision == 19
        assert path.stat().st_size == last_offset
    # The file goes on from the cut: appending and replaying again works.
    async with open_aof(path, store=Store()) as aof:
        assert aof.store.set("k19", b"again").revision == 20
    final = Store()
    replay(str(path), final)
    assert final.get("k19") is not None and final.get("k19").value == b"again"  # type: ignore[union-attr]


async def test_zeros_after_the_last_record_are_a_torn_tail(tmp_path: Path) -> None:
    """A file system may extend the file before the data of an interrupted write lands."""
    path = tmp_path / "node.aof"
    async with open_aof(path) as aof:
        aof.store.set("k", b"v")
    good = path.stat().st_size
    with open(path, "ab") as f:
        f.write(bytes(4096))
    restored = Store()
    result = replay(str(path), restored)
    assert result is not None and result.torn is not None and result.torn.offset == good
    assert restored.get("k") is not None and path.stat().st_size == good


async def test_corruption_before_the_tail_stops_replay_naming_the_offset_and_repair_cuts_there(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node.aof"
    async with open_aof(path) as aof:
        for i in range(10):
            aof.store.set(f"k{i}", f"value-{i}".encode())
    bad_offset, bad_size, _ = records(path)[6]  # the header is record 0: this is revision 6
    data = bytearray(path.read_bytes())
    data[bad_offset + bad_size - 2] ^= 0xFF  # a flipped bit inside the value of revision 6
    path.write_bytes(bytes(data))

    with pytest.raises(AofCorrupt) as caught:
        replay(str(path), Store())
    assert caught.value.offset == bad_offset
    assert f"corrupt at byte offset {bad_offset}: checksum mismatch" in str(caught.value)

    check = subprocess.run([*CLI, "aof-check", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 1
    assert f"corrupt at byte offset {bad_offset}" in check.stdout and "fluxkv aof-repair" in check.stdout

    repair = subprocess.run([*CLI, "aof-repair", str(path)], capture_output=True, text=True, timeout=60)
    assert repair.returncode == 0, repair.stderr
    assert f"cut at byte offset {bad_offset}, after 6 good records (up to revision 5)" in repair.stdout
    assert Path(str(path) + ".before-repair").read_bytes() == bytes(data)
    restored = Store()
    replay(str(path), restored)
    assert sorted(contents(restored)) == [f"k{i}" for i in range(5)] and restored.revision == 5

    again = subprocess.run([*CLI, "aof-check", str(path)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "6 records" in again.stdout


async def test_a_node_refuses_to_start_on_a_corrupt_file_and_says_how_to_repair_it(tmp_path: Path) -> None:
    path = tmp_path / "node.aof"
    async with open_aof(path) as aof:
        for i in range(3):
            aof.store.set(f"k{i}", b"value")
    bad_offset, _, _ = records(path)[1]
    data = bytearray(path.read_bytes())
    data[bad_offset + 4] ^= 0x01  # its checksum
    path.write_bytes(bytes(data))
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(ROOT / "cmd" / "fluxkv-server"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FLUX_AOF_FILENAME": str(path)},
    )
    assert proc.returncode == 1
    assert f"corrupt at byte offset {bad_offset}" in proc.stderr and f"fluxkv aof-repair {path}" in proc.stderr
    assert "serving on" not in proc.stderr
    assert path.read_bytes() == bytes(data)  # left as it was


@pytest.mark.parametrize("policy", ["always", "everysec", "no"])
async def test_a_reader_awaits_the_readable_revision(tmp_path: Path, policy: str) -> None:
    """A reader may read what the file holds as durably as its policy
    promises: fsynced with always and everysec, written with no."""
    async with open_aof(tmp_path / "node.aof", policy) as aof:
        assert aof.readable_revision == 0
        first = asyncio.create_task(aof.wait_past(2))
        second = asyncio.create_task(aof.wait_past(5))  # revision 6 does not exist yet
        for i in range(3):
            aof.store.set(f"k{i}", b"v")
        await first
        c = aof.counters()
        assert aof.readable_revision == 3 and not second.done()
        if policy == "no":  # written to the OS, never fsynced
            assert c.written_revision == 3 and c.fsyncs == 0 and c.durable_revision == 0
        else:
            assert c.durable_revision == 3 and c.fsyncs >= 1
        await aof.wait_past(1)  # readable already: returns at once
        for i in range(3):
            aof.store.set(f"k{i}", b"again")
        await second
        assert aof.readable_revision == 6
        assert [r.revision for r in aof.read_changes(0, aof.readable_revision, 1 << 20)] == list(range(1, 7))


async def test_a_rewrite_under_concurrent_writes_keeps_every_key(tmp_path: Path) -> None:
    path = tmp_path / "node.aof"
    rng = random.Random(3)
    async with open_aof(path, "no") as aof:
        store = aof.store
        for round_ in range(5):  # overwritten five times: most of the file is garbage
            for i in range(5000):
                store.set(f"k{i}", f"{round_}-{i}".encode() * 3)
        await aof.sync()
        stop = asyncio.Event()

        async def writes() -> None:
            while not stop.is_set():
                key = f"k{rng.randrange(6000)}"
                if rng.random() < 0.3:
                    store.delete(key)
                else:
                    store.set(key, rng.randbytes(30), ttl_ms=rng.choice([0, 600_000]))
                await asyncio.sleep(0)

        writer = asyncio.create_task(writes())
        await aof.request_rewrite()
        stop.set()
        await writer
        assert aof.counters().rewrites == 1
    restored = Store()
    result = replay(str(path), restored)
    assert result is not None
    assert contents(restored) == contents(store)
    assert restored.revision == store.revision and restored.epoch == store.epoch
    # Compacted: the 25,000 writes before the rewrite became at most 6,000 live keys.
    assert result.records <= 6000 + (store.revision - 25000)
    assert not Path(str(path) + ".rewrite").exists()


async def test_a_rewrite_keeps_every_change_after_the_lowest_hold(tmp_path: Path) -> None:
    path = tmp_path / "node.aof"
    async with open_aof(path) as aof:
        for i in range(100):
            aof.store.set(f"k{i % 10}", f"v{i}".encode())
    aof = AppendOnlyFile(AofSettings(str(path), "always", 1 << 40, 0, 64 << 20), Store())
    aof.open()
    readers = [aof.hold(70), aof.hold(40)]
    aof.store.attach_sink(aof)
    aof.start()
    await aof.request_rewrite()
    after = aof.read_changes(40, 100, 1 << 20)
    assert [(r.revision, r.key, r.value) for r in after] == [
        (i + 1, f"k{i % 10}", f"v{i}".encode()) for i in range(40, 100)
    ]
    # Raised past the other reader's: the next rewrite keeps only what that one holds.
    readers[1].revision = 90
    await aof.request_rewrite()
    assert [r.revision for r in aof.read_changes(0, 100, 1 << 20)] == list(range(71, 101))
    # Raised to the end: nothing left to keep but the snapshot.
    for reader in readers:
        reader.revision = 100
    await aof.request_rewrite()
    assert aof.read_changes(0, 100, 1 << 20) == []
    await aof.close()
    restored = Store()
    result = replay(str(path), restored)
    assert result is not None and result.records == 10  # the snapshot of the 10 keys
    assert contents(restored) == contents(aof.store) and restored.revision == 100


# The child process: fills an AOF, rewrites it with writes in the middle of the
# rewrite, and dies by SIGKILL right after the step named in argv[2],
# printing (on stdout) the store's contents as they were then.
CRASHING_REWRITE = """
import asyncio, json, os, signal, sys
from fluxkv.aof import rewrite as aof_rewrite
from fluxkv.aof.file import AofSettings, AppendOnlyFile
from fluxkv.core.store import Store

def dump(store):
    items = {}
    for index in range(256):
        for key, e in store.shard_entries(index):
            items[key] = [e.value.hex(), e.mod_revision, e.expires_at_ms]
    print(json.dumps({"revision": store.revision, "items": items}), flush=True)

async def main(path, crash_at):
    store = Store()
    aof = AppendOnlyFile(AofSettings(path, "always", 1 << 40, 0, 1 << 26), store)
    aof.open()
    store.attach_sink(aof)
    aof.start()
    for i in range(3000):
        store.set(f"k{i % 700}", f"v{i}".encode(), ttl_ms=3_600_000 if i % 5 == 0 else 0)
    await aof.sync()
    for step in aof_rewrite.steps(aof):
        if step == "shard 100":  # changes during the rewrite: the tail it copies
            for i in range(400):
                if i % 4 == 0:
                    store.delete(f"k{i}")
                else:
                    store.set(f"k{i}", f"during-{i}".encode())
            await aof.sync()
        if step == crash_at:
            dump(store)
            os.kill(os.getpid(), signal.SIGKILL)
    for i in range(50):  # after the switch: these go to the new file
        store.set(f"after-{i}", b"x")
    await aof.sync()
    dump(store)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

REWRITE_STEPS = [
    "header",
    "shard 0",
    "shard 100",
    "shard 255",
    "synced",
    "renamed",
    "directory synced",
    "never",
]


@pytest.mark.parametrize("crash_at", REWRITE_STEPS)
def test_a_crash_at_any_step_of_a_rewrite_leaves_a_file_that_replays_correctly(tmp_path: Path, crash_at: str) -> None:
    path = tmp_path / "node.aof"
    child = subprocess.run(
        [sys.executable, "-c", CRASHING_REWRITE, str(path), crash_at], capture_output=True, text=True, timeout=120
    )
    assert child.returncode == -9, child.stderr
    expected = json.loads(child.stdout)
    store = Store()
    result = replay(str(path), store)
    assert result is not None and result.torn is None
    assert store.revision == expected["revision"]
    got = {k: [v.hex(), r, e] for k, (v, r, e) in contents(store).items()}
    assert got == expected["items"]
    # A node opening it removes what the interrupted rewrite left behind.
    aof = AppendOnlyFile(AofSettings(str(path), "always", 1 << 40, 0, 1 << 26), Store())
    aof.open()
    assert not Path(str(path) + ".rewrite").exists()
    assert aof.store.revision == expected["revision"]


# The child process: a file that cannot grow (RLIMIT_FSIZE) makes writes fail
# and then succeed again once it can; prints what it saw as JSON.
FAILING_DISK = """
import asyncio, json, os, resource, signal, sys
from fluxkv.aof.file import AofSettings, AppendOnlyFile
from fluxkv.aof.replay import replay
from fluxkv.core.errors import KVError
from fluxkv.core.store import Store

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, write() fails with EFBIG

async def main(path):
    store = Store()
    aof = AppendOnlyFile(AofSettings(path, "always", 1 << 40, 0, 1 << 26), store)
    aof.open()
    store.attach_sink(aof)
    aof.start()
    store.set("before", b"v")
    await aof.sync()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 100, hard))
    seen = {}
    written = store.set("big", b"x" * 1000)
    try:
        await aof.acknowledged(written.revision)
    except KVError as exc:
        seen["acknowledged"] = [exc.kind.name, str(exc)]
    try:
        aof.check_writable()
    except KVError as exc:
        seen["refused"] = [exc.kind.name, str(exc)]
    seen["state"] = aof.counters().state
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    for _ in range(100):  # the writer tries again every second
        try:
            await aof.sync()
            break
        except KVError:
            await asyncio.sleep(0.1)
    seen["state after"] = aof.counters().state
    store.set("after", b"v")
    await aof.sync()
    await aof.close()
    again = Store()
    replay(path, again)
    seen["replayed"] = sorted(k for i in range(256) for k, _ in again.shard_entries(i))
    print(json.dumps(seen))

asyncio.run(main(sys.argv[1]))
"""


def test_a_write_that_fails_refuses_writes_until_the_file_can_be_written_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "node.aof"
    child = subprocess.run([sys.executable, "-c", FAILING_DISK, str(path)], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr
    seen = json.loads(child.stdout)
    kind, message = seen["acknowledged"]
    assert kind == "UNAVAILABLE" and "applied in memory" in message and "not durable" in message
    kind, message = seen["refused"]
    assert kind == "UNAVAILABLE" and "File too large" in message and "writes are refused" in message
    assert seen["state"] == "failing" and seen["state after"] == "ok"
    assert seen["replayed"] == ["after", "before", "big"]
    assert "cannot write the append-only file" in child.stderr and "can be written again" in child.stderr
