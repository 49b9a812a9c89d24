"""Watch: over real gRPC against a node in this process (replay from a
revision, prefixes, start 0, the history's bounds, shutdown, bad input), and
WatchHub's history and batches without gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from fluxkv.core.changes import ChangeRecord, Op
from fluxkv.core.errors import ErrorKind, KVError
from fluxkv.core.store import shard_of
from fluxkv.core.watch import WatchHub
from fluxkv.obs.metrics import RequestMetrics
from fluxkv.proto import kv_pb2 as pb
from fluxkv.proto import kv_pb2_grpc
from fluxkv.server import grpc_transport
from fluxkv.server.node import Node
from tests.conftest import eventually, http_get, running_node, settings

WatchCall = grpc.aio.UnaryStreamCall


async def read_events(call: WatchCall, count: int) -> list[pb.Event]:
    """Read responses until `count` events have come."""
    events: list[pb.Event] = []
    while len(events) < count:
        response = await call.read()
        assert response is not grpc.aio.EOF, "the watch ended"
        events.extend(response.events)
    return events


async def expect_end(call: WatchCall, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == code, info.value.details()
    details = info.value.details() or ""
    for fragment in fragments:
        assert fragment in details
    return details


async def live_watch(kv: kv_pb2_grpc.KVStub, prefix: str = "", start_revision: int = 0) -> WatchCall:
    """A Watch call, once the node has set it up (its headers arrived)."""
    call = kv.Watch(pb.WatchRequest(prefix=prefix, start_revision=start_revision))
    await call.initial_metadata()
    return call


# -- over gRPC ---------------------------------------------------------------


async def test_watch_from_a_revision_replays_every_change_in_order(kv: kv_pb2_grpc.KVStub) -> None:
    await kv.Set(pb.SetRequest(key="user:1", value=b"alice"))
    await kv.Set(pb.SetRequest(key="bin", value=b"\xff\x00\xfe", ttl_ms=600_000))
    await kv.Delete(pb.DeleteRequest(key="user:1"))
    await kv.Set(pb.SetRequest(key="short", value=b"v", ttl_ms=1))
    # Nobody reads "short" again: the active expiry cycle removes it, as revision 5.
    events = await read_events(kv.Watch(pb.WatchRequest(start_revision=1)), 5)
    assert [(e.revision, e.op, e.key, e.value) for e in events] == [
        (1, pb.Event.OP_SET, "user:1", b"alice"),
        (2, pb.Event.OP_SET, "bin", b"\xff\x00\xfe"),
        (3, pb.Event.OP_DELETE, "user:1", b""),
        (4, pb.Event.OP_SET, "short", b"v"),
        (5, pb.Event.OP_EXPIRE, "short", b""),
    ]
    assert [e.shard for e in events] == [shard_of(e.key) for e in events]
    assert all(e.ts_ms > 0 for e in events)
    assert events[1].ts_ms + 599_000 < events[1].expires_at_ms <= events[1].ts_ms + 600_000
    assert [e.expires_at_ms for e in events[2:]] == [0, events[3].ts_ms + 1, 0]
    middle = await read_events(kv.Watch(pb.WatchRequest(start_revision=3)), 3)
    assert [e.revision for e in middle] == [3, 4, 5]


async def test_watch_with_a_prefix_sees_only_matching_keys(kv: kv_pb2_grpc.KVStub) -> None:
    keys = ["user:1", "order:1", "user:2", "users", "order:2"]
    await kv.MultiSet(pb.MultiSetRequest(items=[pb.SetRequest(key=k, value=k.encode()) for k in keys]))
    await kv.Delete(pb.DeleteRequest(key="order:1"))
    await kv.Delete(pb.DeleteRequest(key="user:1"))
    call = kv.Watch(pb.WatchRequest(prefix="user:", start_revision=1))
    assert [(e.revision, e.key) for e in await read_events(call, 3)] == [(1, "user:1"), (3, "user:2"), (7, "user:1")]
    await kv.Set(pb.SetRequest(key="order:3", value=b"o"))
    await kv.Set(pb.SetRequest(key="user:3", value=b"u"))
    assert [(e.revision, e.key) for e in await read_events(call, 1)] == [(9, "user:3")]


async def test_watch_from_zero_sees_only_later_changes(kv: kv_pb2_grpc.KVStub) -> None:
    await kv.Set(pb.SetRequest(key="before", value=b"1"))
    call = await live_watch(kv)
    await kv.Set(pb.SetRequest(key="after", value=b"2"))
    assert [(e.revision, e.key) for e in await read_events(call, 1)] == [(2, "after")]
    info = await kv.Info(pb.InfoRequest())
    watch = next(s for s in info.subsystems if s.name == "watch")
    assert watch.state == "running" and watch.detail.startswith("1 watchers; holds revisions 1 to 2 (2 changes")


async def test_watch_from_a_future_revision_waits_for_it(kv: kv_pb2_grpc.KVStub) -> None:
    await kv.Set(pb.SetRequest(key="a", value=b"1"))
    call = await live_watch(kv, start_revision=3)
    for key in ("b", "c", "d"):
        await kv.Set(pb.SetRequest(key=key, value=b"v"))
    assert [(e.revision, e.key) for e in await read_events(call, 2)] == [(3, "c"), (4, "d")]


@pytest.mark.usefixtures("grpc_server")
async def test_responses_carry_at_most_a_batch() -> None:
    async with running_node(max_batch_items=4, max_batch_bytes=20_000) as (_, kv):
        await kv.MultiSet(pb.MultiSetRequest(items=[pb.SetRequest(key=f"k{i}", value=b"v") for i in range(4)]))
        for i in range(3):
            await kv.Set(pb.SetRequest(key=f"big{i}", value=b"x" * 9_000))
        # Every change is held before the watch starts: each response is full.
        call = kv.Watch(pb.WatchRequest(start_revision=1))
        sizes = []
        while sum(sizes) < 7:
            response = await call.read()
            assert response is not grpc.aio.EOF
            sizes.append(len(response.events))
        assert sizes == [4, 2, 1]


@pytest.mark.usefixtures("grpc_server")
async def test_watch_from_a_revision_no_longer_held_is_out_of_range() -> None:
    async with running_node(watch_history=3) as (_, kv):
        await kv.MultiSet(pb.MultiSetRequest(items=[pb.SetRequest(key=f"k{i}", value=b"v") for i in range(10)]))
        await expect_end(
            kv.Watch(pb.WatchRequest(start_revision=7)),
            grpc.StatusCode.OUT_OF_RANGE,
            "revision 7 is no longer held",
            "the oldest this node holds is 8",
            "FLUX_WATCH_HISTORY keeps 3 changes",
            "watch again from R + 1",
        )
        oldest = await read_events(kv.Watch(pb.WatchRequest(start_revision=8)), 3)
        assert [e.revision for e in oldest] == [8, 9, 10]


@pytest.mark.usefixtures("grpc_server")
async def test_a_watcher_that_falls_behind_ends_out_of_range() -> None:
    async with running_node(watch_history=5) as (node, kv):
        call = await live_watch(kv)
        # One call writes 10 changes before the watcher can read the first.
        await kv.MultiSet(pb.MultiSetRequest(items=[pb.SetRequest(key=f"k{i}", value=b"v") for i in range(10)]))
        await expect_end(
            call,
            grpc.StatusCode.OUT_OF_RANGE,
            "fell behind: it needed revision 1",
            "the oldest this node still holds is 6",
        )
        assert node.watch_hub.fell_behind == 1
        info = await kv.Info(pb.InfoRequest())
        detail = next(s.detail for s in info.subsystems if s.name == "watch")
        assert "0 watchers;" in detail and "revisions 6 to 10" in detail and "1 watchers fell behind" in detail


@pytest.mark.usefixtures("grpc_server")
async def test_a_caller_that_cancels_its_watch_ends_the_stream_in_the_node() -> None:
    async with running_node() as (node, kv):
        call = await live_watch(kv)
        await kv.Set(pb.SetRequest(key="k", value=b"v"))
        assert [e.key for e in (await call.read()).events] == ["k"]
        assert node.watch_hub.watchers == 1
        call.cancel()
        assert node.admin is not None
        port = node.admin.port

        async def counted_cancelled() -> bool:
            page = (await http_get(port, "/metrics")).text
            return 'fluxkv_requests_total{method="fluxkv.v1.KV/Watch",code="CANCELLED"} 1' in page

        await eventually(counted_cancelled, "the transport counts the cancelled stream as it ends")
        assert node.watch_hub.watchers == 0


@pytest.mark.usefixtures("grpc_server")
async def test_shutdown_ends_an_open_watch_at_once_with_unavailable() -> None:
    # A grace period longer than the test's timeout: were the watch left to
    # hold the shutdown, this test would time out instead of passing.
    node = Node(settings(shutdown_grace_s=600))
    await node.start()
    async with grpc.aio.insecure_channel(node.address) as channel:
        kv = kv_pb2_grpc.KVStub(channel)
        call = await live_watch(kv)
        stopping = asyncio.create_task(node.stop())
        await expect_end(call, grpc.StatusCode.UNAVAILABLE, "shutting down", "watch another node or retry")
        await stopping
    assert node.watch_hub.watchers == 0


@pytest.mark.parametrize(
    ("request_", "fragments"),
    [
        (pb.WatchRequest(prefix="p" * 4097), ["prefix is 4097 bytes", "limit of 4096 bytes", "FLUX_MAX_KEY_BYTES"]),
        (pb.WatchRequest(start_revision=-1), ["start_revision must be 0", "or a revision above 0, got -1"]),
    ],
)
async def test_bad_watch_request_is_invalid_argument(
    kv: kv_pb2_grpc.KVStub, request_: pb.WatchRequest, fragments: list[str]
) -> None:
    await expect_end(kv.Watch(request_), grpc.StatusCode.INVALID_ARGUMENT, *fragments)
    assert (await kv.Set(pb.SetRequest(key="k", value=b"v"))).revision == 1


async def test_malformed_watch_request_is_invalid_argument(channel: grpc.aio.Channel) -> None:
    raw_watch = channel.unary_stream("/fluxkv.v1.KV/Watch", request_serializer=bytes, response_deserializer=bytes)
    await expect_end(
        raw_watch(b"\x0a\x02\xff\xfe"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a valid fluxkv.v1.WatchRequest",
        "String field had bad UTF-8",
    )


# -- WatchHub ----------------------------------------------------------------


def record(revision: int, key: str = "k", value: bytes | None = b"v") -> ChangeRecord:
    return ChangeRecord(revision, Op.SET if value is not None else Op.DELETE, key, value, 0, revision, shard_of(key))


def filled(hub: WatchHub, records: Iterator[ChangeRecord] | list[ChangeRecord]) -> WatchHub:
    for r in records:
        hub.append(r)
    return hub


async def test_hub_keeps_the_latest_records_up_to_its_count() -> None:
    hub = filled(WatchHub(max_records=3, max_bytes=1_000), (record(i) for i in range(1, 6)))
    assert (hub.oldest_revision, hub.newest_revision, hub.held_bytes) == (3, 5, 6)
    with pytest.raises(KVError) as info:
        hub.watch("", 2, 100, 1_000)
    assert info.value.kind is ErrorKind.OUT_OF_RANGE
    assert "the oldest this node holds is 3" in info.value.message
    batch = await anext(hub.watch("", 3, 100, 1_000))
    assert [r.revision for r in batch] == [3, 4, 5]


async def test_hub_keeps_the_latest_records_up_to_its_bytes_and_always_the_last() -> None:
    hub = WatchHub(max_records=100, max_bytes=10)
    filled(hub, [record(1), record(2, "é", b"ab"), record(3, "k", None)])  # 2, 4 and 1 bytes
    assert (hub.oldest_revision, hub.held_bytes) == (1, 7)
    hub.append(record(4, "key", b"1234"))  # 7 bytes: revisions 1 and 2 must go
    assert (hub.oldest_revision, hub.newest_revision, hub.held_bytes) == (3, 4, 8)
    hub.append(record(5, "huge", b"x" * 100))
    assert (hub.oldest_revision, hub.newest_revision, hub.held_bytes) == (5, 5, 104)
    batch = await anext(hub.watch("", 5, 100, 10))
    assert [r.revision for r in batch] == [5]


async def test_hub_batches_respect_items_bytes_and_prefix() -> None:
    hub = WatchHub(max_records=100, max_bytes=10_000)
    filled(hub, [record(1, "a1"), record(2, "b1"), record(3, "a2"), record(4, "a3", b"x" * 50), record(5, "a4")])
    batches = hub.watch("a", 1, 2, 10)
    assert [[r.revision for r in await anext(batches)] for _ in range(3)] == [[1, 3], [4], [5]]
    await batches.aclose()
    assert hub.watchers == 0


async def test_hub_watcher_waits_for_changes_and_falls_behind_when_they_are_evicted() -> None:
    hub = filled(WatchHub(max_records=3, max_bytes=1_000), [record(1)])
    batches = hub.watch("", 0, 100, 1_000)
    waiting = asyncio.ensure_future(anext(batches))
    await asyncio.sleep(0)  # let it start and wait
    assert hub.watchers == 1 and not waiting.done()
    hub.append(record(2))
    assert [r.revision for r in await waiting] == [2]
    filled(hub, (record(i) for i in range(3, 7)))  # revision 3 is evicted unread
    with pytest.raises(KVError) as info:
        await anext(batches)
    assert info.value.kind is ErrorKind.OUT_OF_RANGE
    assert "it needed revision 3" in info.value.message and "still holds is 4" in info.value.message
    assert (hub.fell_behind, hub.watchers) == (1, 0)


async def test_hub_close_ends_every_watch_and_refuses_new_ones() -> None:
    hub = WatchHub(max_records=3, max_bytes=1_000)
    waiting = [asyncio.ensure_future(anext(hub.watch("", 0, 10, 10))) for _ in range(2)]
    await asyncio.sleep(0)
    assert hub.watchers == 2
    hub.close()
    for future in waiting:
        with pytest.raises(KVError) as info:
            await future
        assert info.value.kind is ErrorKind.UNAVAILABLE
    with pytest.raises(KVError) as info:
        hub.watch("", 0, 10, 10)
    assert info.value.kind is ErrorKind.UNAVAILABLE
    assert hub.watchers == 0


def test_transport_refuses_a_handler_of_the_wrong_kind() -> None:
    async def unary(request: object) -> object:
        return request

    def stream(request: object) -> AsyncIterator[object]:
        raise AssertionError("not called")

    methods = {name: unary for name in ("Get", "Set", "Delete", "MultiGet", "MultiSet", "Scan", "Info", "RewriteAof")}
    with pytest.raises(ValueError, match="Watch: the proto's method needs a function returning an async generator"):
        grpc_transport._method_handlers("fluxkv.v1.KV", {**methods, "Watch": unary}, RequestMetrics(), None)
    with pytest.raises(ValueError, match="Get: the proto's method needs an async function"):
        grpc_transport._method_handlers(
            "fluxkv.v1.KV", {**methods, "Get": stream, "Watch": stream}, RequestMetrics(), None
        )
