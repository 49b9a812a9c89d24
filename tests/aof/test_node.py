"""The append-only file in a node: SIGKILL in the middle of a load of sets,
deletes and expiries loses no acknowledged write, and with CDC (in both
formats) no acknowledged write or recorded expiry is missing from the stream
even when the broker was down while the node died; a full CDC queue spills to
the file; rewrites on demand and by size."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import aio_pika
import grpc
import pytest

from deploy.private_servers import RabbitBroker
from fluxkv import config
from fluxkv.aof.replay import replay
from fluxkv.core.changes import Op
from fluxkv.core.store import Store
from fluxkv.proto import kv_pb2 as pb
from fluxkv.proto import kv_pb2_grpc
from fluxkv.server import workers
from tests.cdc.test_publisher import (
    DECODERS,
    EXPIRY,
    FORMATS,
    Change,
    Decode,
    deduplicated,
    drain,
    mixed_change,
    ttl_key,
    write_mixed,
)
from tests.conftest import ROOT, Names, running_node, server_process

WRITERS = 8


class Load(NamedTuple):
    """What write_until_killed's callers saw: the writes acknowledged, by
    revision, and each caller's write in flight when the node died (never
    acknowledged, so the file may or may not hold it)."""

    acked: dict[int, Change]
    in_flight: list[Change]


async def write_until_killed(address: str, kill: asyncio.Event, count: int) -> Load:
    """Write a mixed load (write_mixed) from WRITERS concurrent callers; set
    `kill` once `count` writes were acknowledged; return what they saw once
    every caller has seen the node die."""
    load = Load({}, [])
    async with grpc.aio.insecure_channel(address) as channel:
        kv = kv_pb2_grpc.KVStub(channel)

        async def writer(w: int) -> None:
            i = 0
            while True:
                try:
                    revision, change = await write_mixed(kv, f"w{w}-", i)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
                    load.in_flight.append(mixed_change(f"w{w}-", i)[0])
                    return
                load.acked[revision] = change
                if len(load.acked) >= count:
                    kill.set()
                i += 1

        await asyncio.gather(*(writer(w) for w in range(WRITERS)))
    return load


async def killed_under_load(env: Mapping[str, str], count: int) -> tuple[Load, str]:
    """Start a node, load it, SIGKILL it mid-load: what its callers saw, and its epoch."""
    with server_process(env=env) as server:
        async with grpc.aio.insecure_channel(server.address) as channel:
            epoch = (await kv_pb2_grpc.KVStub(channel).Info(pb.InfoRequest())).epoch
        kill = asyncio.Event()
        writes = asyncio.create_task(write_until_killed(server.address, kill, count))
        await kill.wait()
        server.proc.kill()
        load = await writes
        assert server.wait() == -9
    return load, epoch


State = dict[str, tuple[bytes, int]]


def final_state(acked: dict[int, Change]) -> State:
    """The keys these changes leave, with their values and mod revisions (a
    key set with a TTL has expired)."""
    state: State = {}
    for revision in sorted(acked):
        op, key, value = acked[revision]
        if op is Op.SET and value is not None and not ttl_key(key):
            state[key] = (value, revision)
        else:
            state.pop(key, None)
    return state


def assert_survived(found: State, load: Load) -> None:
    """`found` (the keys a restarted node holds) is what the acknowledged
    writes leave; a key written by a write in flight at the kill holds that
    either before or after it (each caller writes keys of its own, one at a
    time, so a key has at most one such write, the last)."""
    expected = final_state(load.acked)
    touched = {key for _, key, _ in load.in_flight}
    assert {k: v for k, v in found.items() if k not in touched} == {
        k: v for k, v in expected.items() if k not in touched
    }
    for op, key, value in load.in_flight:
        before = expected.get(key)
        if op is Op.SET and not ttl_key(key):
            after_ok = key in found and found[key][0] == value and found[key][1] not in load.acked
        else:  # a Delete, or a Set with a 1 ms TTL: the key is gone either way once applied
            after_ok = key not in found
        assert found.get(key) == before or after_ok, (op, key, found.get(key), before)


async def read_back(kv: kv_pb2_grpc.KVStub, keys: list[str]) -> State:
    found = {}
    for start in range(0, len(keys), 500):
        part = keys[start : start + 500]
        answer = await kv.MultiGet(pb.MultiGetRequest(keys=part))
        for key, r in zip(part, answer.results, strict=True):
            if r.found:
                found[key] = (r.value, r.mod_revision)
    return found


@pytest.mark.usefixtures("grpc_server")
async def test_no_acknowledged_write_is_lost_when_the_node_is_killed(tmp_path: Path) -> None:
    env = {"FLUX_AOF_FILENAME": str(tmp_path / "node.aof"), "FLUX_AOF_APPEND_FSYNC": "always"}
    load, epoch = await killed_under_load(env, 3000)
    acked = load.acked
    assert len(acked) >= 3000 and len(load.in_flight) == WRITERS
    with server_process(env=env) as server:
        assert "append-only file" in server.log and "replayed" in server.log
        async with grpc.aio.insecure_channel(server.address) as channel:
            kv = kv_pb2_grpc.KVStub(channel)
            written = {key for _, key, _ in [*acked.values(), *load.in_flight]}
            assert_survived(await read_back(kv, sorted(written)), load)
            info = await kv.Info(pb.InfoRequest())
            assert info.epoch == epoch
            # Writes in flight at the kill may be in the file too (never acknowledged): above the last acknowledged.
            assert info.revision >= max(acked)
            after = await kv.Set(pb.SetRequest(key="after-restart", value=b"v"))
            assert after.revision == info.revision + 1
            assert info.aof.enabled and info.aof.fsync_policy == "always" and info.aof.state == "ok"
            assert info.aof.path == env["FLUX_AOF_FILENAME"]
        assert server.stop() == 0


async def consume_until(
    url: str, queue: str, wanted: set[int], decode: Decode, timeout: float = 60
) -> dict[int, tuple[Op, str]]:
    """Read `queue` until every revision in `wanted` has arrived (deduplicated by
    node, epoch and revision), each message read by `decode`; return what arrived."""
    seen: dict[int, tuple[Op, str]] = {}
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, durable=True)  # as the node declares it, maybe later
        async with asyncio.timeout(timeout), q.iterator() as messages:
            async for message in messages:
                async with message.process():
                    for event in decode(message.body):
                        seen.setdefault(event.rev, (event.op, event.key))
                if wanted <= set(seen):
                    break
    return seen


@pytest.mark.usefixtures("grpc_server")
@pytest.mark.parametrize("cdc_format", FORMATS)
async def test_no_acknowledged_write_is_missing_from_cdc_after_a_kill_with_the_broker_down(
    tmp_path: Path, rabbit_broker: RabbitBroker, names: Names, cdc_format: str
) -> None:
    await asyncio.to_thread(rabbit_broker.stop)
    env = {
        "FLUX_AOF_FILENAME": str(tmp_path / "node.aof"),
        "FLUX_AOF_APPEND_FSYNC": "always",
        "FLUX_RABBITMQ_URL": rabbit_broker.url,
        "FLUX_CDC_EXCHANGE": names.exchange,
        "FLUX_CDC_QUEUE": names.queue,
        "FLUX_CDC_FORMAT": cdc_format,
    }
    acked = (await killed_under_load(env, 1500))[0].acked
    await asyncio.to_thread(rabbit_broker.start)
    with server_process(env=env) as server:
        # Every revision up to the last acknowledged one: the writes, and the expiries the node recorded.
        wanted = set(range(1, max(acked) + 1))
        events = await consume_until(rabbit_broker.url, names.queue, wanted, DECODERS[cdc_format])
        for revision, (op, key, _) in acked.items():
            assert events[revision] == (op, key)
        # Writes are Sets and Deletes of keys without a TTL: the other changes of keys with one are expiries.
        expiries = [op for op, key in events.values() if ttl_key(key) and op is not Op.SET]
        assert expiries and set(expiries) == {EXPIRY[cdc_format]}
        assert server.stop() == 0
        assert "the broker confirmed every CDC event" in server.log


@pytest.mark.usefixtures("grpc_server")
async def test_a_full_cdc_queue_spills_to_the_file_without_blocking_or_dropping(
    tmp_path: Path, rabbit_broker: RabbitBroker, names: Names
) -> None:
    await asyncio.to_thread(rabbit_broker.stop)
    small = {"max_batch_items": 5, "cdc_queue_events": 10, "cdc_block_timeout_ms": 0}
    options = {"cdc_exchange": names.exchange, "cdc_queue": names.queue, "cdc_flush_timeout_s": 60.0}
    path = str(tmp_path / "node.aof")
    async with running_node(aof_filename=path, rabbitmq_url=rabbit_broker.url, **small, **options) as (_, kv):
        for i in range(300):  # with policy block and no file, the 11th write would fail
            await kv.Set(pb.SetRequest(key=f"k{i}", value=b"v"))
        info = await kv.Info(pb.InfoRequest())
        assert info.cdc.full_policy == "spill"
        assert info.cdc.spilled == 290 and info.cdc.dropped == 0 and info.cdc.writes_refused == 0
        await asyncio.to_thread(rabbit_broker.start)
    events = deduplicated(await drain(rabbit_broker.url, names.queue))
    assert [(e.rev, e.key) for e in events] == [(i + 1, f"k{i}") for i in range(300)]


@pytest.mark.usefixtures("grpc_server")
async def test_a_rewrite_keeps_every_change_cdc_has_not_confirmed(
    tmp_path: Path, rabbit_broker: RabbitBroker, names: Names
) -> None:
    path = tmp_path / "node.aof"
    options = {
        "aof_filename": str(path),
        "aof_rewrite_percent": 0,
        "rabbitmq_url": rabbit_broker.url,
        "cdc_exchange": names.exchange,
        "cdc_queue": names.queue,
        "cdc_queue_events": 10,
        "cdc_flush_timeout_s": 60.0,
    }
    async with running_node(**options) as (_, kv):
        for i in range(50):
            await kv.Set(pb.SetRequest(key=f"k{i % 10}", value=f"v{i}".encode()))
    assert '"confirmed_revision":50' in (tmp_path / "node.aof.cdc-checkpoint").read_text()
    await asyncio.to_thread(rabbit_broker.stop)
    async with running_node(**options) as (_, kv):
        for i in range(50, 300):  # unconfirmed, most of them spilled to the file
            await kv.Set(pb.SetRequest(key=f"k{i % 10}", value=f"v{i}".encode()))
        await kv.RewriteAof(pb.RewriteAofRequest())
        info = await kv.Info(pb.InfoRequest())
        assert info.aof.rewrites == 1 and info.aof.cdc_checkpoint_revision == 50 and info.cdc.spilled == 240
        await asyncio.to_thread(rabbit_broker.start)
    events = deduplicated(await drain(rabbit_broker.url, names.queue))
    assert [(e.rev, e.key, e.value) for e in events] == [(i + 1, f"k{i % 10}", f"v{i}".encode()) for i in range(300)]
    # The rewrite compacted what the broker had confirmed (the checkpoint) and kept the rest as changes.
    result = replay(str(path), Store())
    assert result is not None and result.records == 10 + 250


@pytest.mark.usefixtures("grpc_server")
async def test_a_clean_restart_resumes_cdc_after_the_checkpoint(tmp_path: Path, names: Names) -> None:
    options = {"aof_filename": str(tmp_path / "node.aof"), "cdc_exchange": names.exchange, "cdc_queue": names.queue}
    from tests.conftest import BROKER

    async with running_node(rabbitmq_url=BROKER, **options) as (_, kv):
        for i in range(50):
            await kv.Set(pb.SetRequest(key=f"k{i}", value=b"v"))
    first = await drain(BROKER, names.queue)
    assert [e.rev for e in deduplicated(first)] == list(range(1, 51))
    checkpoint = (tmp_path / "node.aof.cdc-checkpoint").read_text()
    assert '"confirmed_revision":50' in checkpoint
    async with running_node(rabbitmq_url=BROKER, **options) as (node, kv):
        assert node.store.revision == 50
        assert (await kv.Info(pb.InfoRequest())).aof.cdc_checkpoint_revision == 50
        await kv.Set(pb.SetRequest(key="after", value=b"v"))
    assert '"confirmed_revision":51' in (tmp_path / "node.aof.cdc-checkpoint").read_text()
    second = await drain(BROKER, names.queue)
    assert [(e.rev, e.key) for d in second for e in d.events] == [(51, "after")]


@pytest.mark.usefixtures("grpc_server")
async def test_rewrite_on_demand_from_the_command_line_and_by_size(tmp_path: Path) -> None:
    path = tmp_path / "node.aof"
    # always: every acknowledged write is in the file, so Info's size is the CLI's "before".
    async with running_node(aof_filename=str(path), aof_append_fsync="always", aof_rewrite_percent=0) as (node, kv):
        for _ in range(10):
            items = [pb.SetRequest(key=f"k{i}", value=b"x" * 50) for i in range(500)]
            await kv.MultiSet(pb.MultiSetRequest(items=items))
        before = (await kv.Info(pb.InfoRequest())).aof.size_bytes
        cli = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, str(ROOT / "cmd" / "fluxkv"), "--addr", node.address, "rewrite-aof"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        info = (await kv.Info(pb.InfoRequest())).aof
        assert f"{before} -> {info.size_bytes} bytes" in cli.stdout
        assert info.rewrites == 1 and info.size_bytes < before / 5
    async with running_node(aof_filename=str(path)) as (node, kv):
        assert len(node.store) == 500 and node.store.revision == 5000
        got = await kv.Get(pb.GetRequest(key="k7"))
        assert got.value == b"x" * 50 and got.mod_revision == 4508
    # By size: once the file has doubled past FLUX_AOF_REWRITE_MIN_BYTES.
    async with running_node(
        aof_filename=str(tmp_path / "auto.aof"), aof_rewrite_min_bytes=20_000, aof_rewrite_percent=100
    ) as (node, kv):
        i = 0
        while (await kv.Info(pb.InfoRequest())).aof.rewrites == 0:
            await kv.Set(pb.SetRequest(key=f"k{i % 100}", value=b"y" * 100))
            i += 1
        assert i > 100


async def test_rewrite_without_a_file_is_a_failed_precondition(kv: kv_pb2_grpc.KVStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await kv.RewriteAof(pb.RewriteAofRequest())
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "FLUX_AOF_FILENAME is empty" in (caught.value.details() or "")


def test_each_worker_has_a_file_of_its_own() -> None:
    settings = config.Settings(workers=2, aof_filename="/data/fluxkv.aof")
    assert [workers.worker_environment(settings, i)["FLUX_AOF_FILENAME"] for i in range(2)] == [
        "/data/fluxkv.aof.0",
        "/data/fluxkv.aof.1",
    ]
