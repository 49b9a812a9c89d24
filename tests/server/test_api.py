"""End to end over real gRPC: a node on an ephemeral port, every RPC of both
services, health, reflection and every kind of bad input."""

from __future__ import annotations

import asyncio
import typing
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fluxkv.aof.file import AofCounters
from fluxkv.cdc.publisher import CdcCounters
from fluxkv.core.changes import ChangeRecord, Op
from fluxkv.core.errors import ErrorKind
from fluxkv.proto import compat_kv_pb2 as cpb
from fluxkv.proto import compat_kv_pb2_grpc, kv_pb2_grpc
from fluxkv.proto import kv_pb2 as pb
from fluxkv.rpc import status as rpc_status
from fluxkv.server import handlers
from fluxkv.server.node import Node
from tests.conftest import (
    eventually,
    http_get,
    node_whose_writes_wait,
    revision_mismatch,
    server_version,
    settings,
    writes_waiting,
)


async def expect_error(call: object, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    details = info.value.details() or ""
    for fragment in fragments:
        assert fragment in details
    return details


def test_each_error_kind_is_the_grpc_status_code_of_its_name_both_ways() -> None:
    for kind in ErrorKind:
        code = rpc_status.status_code(kind)
        assert code.name == kind.name and rpc_status.kind_of_status(code) is kind
    assert rpc_status.kind_of_status(grpc.StatusCode.INTERNAL) is None


# -- fluxkv.v1.KV ------------------------------------------------------------


async def test_set_get_delete_round_trip(kv: kv_pb2_grpc.KVStub) -> None:
    first = await kv.Set(pb.SetRequest(key="user:1", value=b"\x00alice\xff"))
    assert first.created and first.revision == 1
    second = await kv.Set(pb.SetRequest(key="user:1", value=b"bob"))
    assert not second.created and second.revision == 2
    got = await kv.Get(pb.GetRequest(key="user:1"))
    assert (got.found, got.value, got.mod_revision, got.ttl_ms) == (True, b"bob", 2, 0)
    deleted = await kv.Delete(pb.DeleteRequest(key="user:1"))
    assert deleted.deleted and deleted.revision == 3
    assert not (await kv.Get(pb.GetRequest(key="user:1"))).found
    missing = await kv.Delete(pb.DeleteRequest(key="user:1"))
    assert not missing.deleted and missing.revision == 3


async def test_empty_value_is_a_value(kv: kv_pb2_grpc.KVStub) -> None:
    await kv.Set(pb.SetRequest(key="k", value=b""))
    got = await kv.Get(pb.GetRequest(key="k"))
    assert got.found and got.value == b""


async def test_ttl_is_reported_and_expired_keys_disappear(node: Node, kv: kv_pb2_grpc.KVStub) -> None:
    expired = asyncio.Event()

    class OnExpire:
        def append(self, record: ChangeRecord) -> None:
            if record.op is Op.EXPIRE and record.key == "short":
                expired.set()

    node.store.attach_sink(OnExpire())
    await kv.Set(pb.SetRequest(key="long", value=b"v", ttl_ms=600_000))
    got = await kv.Get(pb.GetRequest(key="long"))
    assert 590_000 < got.ttl_ms <= 600_000
    await kv.Set(pb.SetRequest(key="short", value=b"v", ttl_ms=1))
    # Nobody reads "short" again: the active expiry cycle must remove it.
    await asyncio.wait_for(expired.wait(), 10)
    assert not (await kv.Get(pb.GetRequest(key="short"))).found
    info = await kv.Info(pb.InfoRequest())
    assert info.key_count == 1
    assert "1 keys expired" in info.subsystems[0].detail


async def test_set_only_if_absent(kv: kv_pb2_grpc.KVStub) -> None:
    created = await kv.Set(pb.SetRequest(key="lock", value=b"me", expect_revision=0))
    assert created.created
    details = await expect_error(
        kv.Set(pb.SetRequest(key="lock", value=b"you", expect_revision=0)),
        grpc.StatusCode.ABORTED,
        "'lock'",
        f"revision {created.revision}",
    )
    assert "absent" in details
    assert (await kv.Get(pb.GetRequest(key="lock"))).value == b"me"


async def test_compare_and_set_with_stale_revision_is_refused(kv: kv_pb2_grpc.KVStub) -> None:
    r1 = await kv.Set(pb.SetRequest(key="k", value=b"1"))
    r2 = await kv.Set(pb.SetRequest(key="k", value=b"2", expect_revision=r1.revision))
    await expect_error(
        kv.Set(pb.SetRequest(key="k", value=b"3", expect_revision=r1.revision)),
        grpc.StatusCode.ABORTED,
        f"is at revision {r2.revision}, not the expected {r1.revision}",
    )
    await expect_error(
        kv.Set(pb.SetRequest(key="nope", value=b"3", expect_revision=5)),
        grpc.StatusCode.ABORTED,
        "does not exist",
    )
    assert (await kv.Get(pb.GetRequest(key="k"))).value == b"2"


async def test_concurrent_conditional_writes_exactly_one_wins(kv: kv_pb2_grpc.KVStub) -> None:
    base = await kv.Set(pb.SetRequest(key="cas", value=b"start"))
    writers = 50
    calls = [
        kv.Set(pb.SetRequest(key="cas", value=f"writer {i}".encode(), expect_revision=base.revision))
        for i in range(writers)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    winners = [r for r in results if isinstance(r, pb.SetResponse)]
    losers = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(winners) == 1 and len(losers) == writers - 1
    assert all(e.code() == grpc.StatusCode.ABORTED for e in losers)
    got = await kv.Get(pb.GetRequest(key="cas"))
    assert got.mod_revision == winners[0].revision
    assert got.value == f"writer {results.index(winners[0])}".encode()


async def test_conditional_delete(kv: kv_pb2_grpc.KVStub) -> None:
    r = await kv.Set(pb.SetRequest(key="k", value=b"v"))
    await expect_error(
        kv.Delete(pb.DeleteRequest(key="k", expect_revision=r.revision + 1)),
        grpc.StatusCode.ABORTED,
        "not the expected",
    )
    assert (await kv.Get(pb.GetRequest(key="k"))).found
    deleted = await kv.Delete(pb.DeleteRequest(key="k", expect_revision=r.revision))
    assert deleted.deleted
    await expect_error(
        kv.Delete(pb.DeleteRequest(key="k", expect_revision=0)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "above 0, got 0",
    )


async def test_a_failed_condition_carries_the_current_revision_in_its_details(kv: kv_pb2_grpc.KVStub) -> None:
    first = await kv.Set(pb.SetRequest(key="k", value=b"1"))
    second = await kv.Set(pb.SetRequest(key="k", value=b"2"))
    refused = [
        kv.Set(pb.SetRequest(key="k", value=b"3", expect_revision=first.revision)),
        kv.Set(pb.SetRequest(key="k", value=b"3", expect_revision=0)),
        kv.Delete(pb.DeleteRequest(key="k", expect_revision=first.revision)),
    ]
    for call in refused:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert revision_mismatch(info.value) == {"key": "k", "revision": str(second.revision)}
    for call in (  # an absent key is at revision 0
        kv.Set(pb.SetRequest(key="absent", value=b"v", expect_revision=7)),
        kv.Delete(pb.DeleteRequest(key="absent", expect_revision=7)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert revision_mismatch(info.value) == {"key": "absent", "revision": "0"}
    # The key travels whole, even at the limit (FLUX_MAX_KEY_BYTES), where the message shows only its start.
    longest = "é" * 2048
    await kv.Set(pb.SetRequest(key=longest, value=b"v"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await kv.Set(pb.SetRequest(key=longest, value=b"w", expect_revision=0))
    assert revision_mismatch(info.value) == {"key": longest, "revision": str(second.revision + 1)}


async def test_multi_set_and_multi_get(kv: kv_pb2_grpc.KVStub) -> None:
    await kv.Set(pb.SetRequest(key="taken", value=b"old"))
    response = await kv.MultiSet(
        pb.MultiSetRequest(
            items=[
                pb.SetRequest(key="a", value=b"1"),
                pb.SetRequest(key="b", value=b"2", ttl_ms=60_000),
                pb.SetRequest(key="taken", value=b"new", expect_revision=0),
                pb.SetRequest(key="c", value=b"3", expect_revision=0),
            ]
        )
    )
    applied = [(r.applied, r.created) for r in response.results]
    assert applied == [(True, True), (True, True), (False, False), (True, True)]
    assert response.results[2].revision == 1  # the current revision of "taken"
    got = await kv.MultiGet(pb.MultiGetRequest(keys=["c", "missing", "a", "taken", "b"]))
    assert [(r.found, r.value) for r in got.results] == [
        (True, b"3"),
        (False, b""),
        (True, b"1"),
        (True, b"old"),
        (True, b"2"),
    ]
    assert got.results[4].ttl_ms > 0


async def test_scan_pages_through_every_key_once(kv: kv_pb2_grpc.KVStub) -> None:
    items = [pb.SetRequest(key=f"user:{i:04}", value=f"v{i}".encode()) for i in range(450)]
    await kv.MultiSet(pb.MultiSetRequest(items=items))
    await kv.MultiSet(pb.MultiSetRequest(items=[pb.SetRequest(key=f"order:{i}", value=b"o") for i in range(50)]))
    seen: dict[str, bytes] = {}
    cursor = ""
    pages = 0
    while True:
        page = await kv.Scan(pb.ScanRequest(prefix="user:", cursor=cursor, limit=40, include_values=True))
        assert len(page.items) <= 40
        for item in page.items:
            assert item.key not in seen
            seen[item.key] = item.value
        pages += 1
        cursor = page.cursor
        if not cursor:
            break
    assert pages >= 12
    assert seen == {f"user:{i:04}": f"v{i}".encode() for i in range(450)}
    keys_only = await kv.Scan(pb.ScanRequest(prefix="order:", limit=1000))
    assert len(keys_only.items) == 50 and keys_only.cursor == ""
    assert all(i.value == b"" and i.mod_revision > 0 for i in keys_only.items)


async def test_info_describes_the_node(node: Node, kv: kv_pb2_grpc.KVStub, grpc_server: str) -> None:
    await kv.MultiSet(pb.MultiSetRequest(items=[pb.SetRequest(key=f"k{i}", value=b"12345") for i in range(600)]))
    info = await kv.Info(pb.InfoRequest())
    assert info.node_id == node.node_id and info.node_id.endswith(f":{node.port}")
    assert info.address == node.address
    assert info.revision == 600 and info.key_count == 600
    assert info.data_bytes == sum(len(f"k{i}") + 5 for i in range(600))
    assert info.rss_bytes > 1_000_000
    assert info.uptime_seconds > 0
    assert info.shards.shards == 256 and info.shards.mean_keys == pytest.approx(600 / 256)
    assert info.shards.min_keys <= info.shards.mean_keys <= info.shards.max_keys
    assert info.limits.max_key_bytes == 4096 and info.limits.max_batch_items == 1000
    assert [(s.name, s.state) for s in info.subsystems] == [
        ("active_expiry", "running"),
        ("cdc", "disabled"),
        ("watch", "running"),
        ("etcd", "disabled"),
        ("admin", "running"),
        ("aof", "disabled"),
        ("auth", "disabled"),
        ("grpc", grpc_server),
    ]
    served = f"{server_version(grpc_server)} serves {node.address} in plaintext (FLUX_GRPC_SERVER={grpc_server}, "
    assert info.subsystems[-1].detail == f"{served}FLUX_EVENT_LOOP=auto) on asyncio's event loop"  # pytest's loop


def test_info_statuses_carry_every_counter_by_name() -> None:
    # Info's CdcStatus and AofStatus are built field by field: each counter reaches its field, and
    # every field but `enabled` has its counter (AofStatus's CDC checkpoint comes from the publisher).
    builds = [
        (CdcCounters, handlers.cdc_status, {}),
        (AofCounters, lambda c: handlers.aof_status(c, 4321), {"cdc_checkpoint_revision": 4321}),
    ]
    for counters, build, beside in builds:
        types = typing.get_type_hints(counters)
        values = {
            name: {str: f"value of {name}", int: i + 1, bool: True, float: i + 0.5}[kind]
            for i, (name, kind) in enumerate(types.items())
        }
        status = build(counters(**values))
        assert {f.name for f in status.DESCRIPTOR.fields} == {"enabled", *values, *beside}
        expected = values | beside
        assert status.enabled and all(getattr(status, name) == value for name, value in expected.items())
        assert not build(None).enabled


# -- bad input ---------------------------------------------------------------

BIG_KEY = "k" * 4097


@pytest.mark.parametrize(
    ("rpc", "request_", "fragments"),
    [
        ("Get", pb.GetRequest(key=""), ["key must not be empty"]),
        ("Set", pb.SetRequest(key="", value=b"v"), ["key must not be empty"]),
        ("Delete", pb.DeleteRequest(key=""), ["key must not be empty"]),
        ("Get", pb.GetRequest(key=BIG_KEY), ["4097 bytes", "limit of 4096 bytes", "FLUX_MAX_KEY_BYTES"]),
        ("Get", pb.GetRequest(key="é" * 2049), ["4098 bytes", "limit of 4096"]),
        ("Set", pb.SetRequest(key="k", value=b"x" * (1024 * 1024 + 1)), ["1048577 bytes", "limit of 1048576"]),
        ("Set", pb.SetRequest(key="k", value=b"v", ttl_ms=-5), ["ttl_ms must not be negative, got -5"]),
        ("Set", pb.SetRequest(key="k", value=b"v", expect_revision=-1), ["expect_revision", "got -1"]),
        ("MultiGet", pb.MultiGetRequest(keys=["k"] * 1001), ["1001 items", "limit of 1000", "FLUX_MAX_BATCH_ITEMS"]),
        ("MultiGet", pb.MultiGetRequest(keys=["ok", ""]), ["keys[1]: key must not be empty"]),
        (
            "MultiSet",
            pb.MultiSetRequest(items=[pb.SetRequest(key=f"k{i}") for i in range(1001)]),
            ["1001 items", "limit of 1000"],
        ),
        (
            "MultiSet",
            pb.MultiSetRequest(items=[pb.SetRequest(key="a"), pb.SetRequest(key="b", ttl_ms=-1)]),
            ["items[1]: ttl_ms must not be negative"],
        ),
        (
            "MultiSet",
            pb.MultiSetRequest(items=[pb.SetRequest(key=f"k{i}", value=b"x" * 1_000_000) for i in range(9)]),
            ["9000018 bytes", "limit of 8388608 bytes", "FLUX_MAX_BATCH_BYTES"],
        ),
        ("Scan", pb.ScanRequest(cursor="not a cursor!"), ["invalid cursor", "not a cursor returned by Scan"]),
        ("Scan", pb.ScanRequest(cursor="AAAA"), ["invalid cursor"]),
        ("Scan", pb.ScanRequest(limit=1001), ["limit is 1001", "limit of 1000"]),
    ],
)
async def test_bad_input_is_invalid_argument_and_the_node_keeps_serving(
    kv: kv_pb2_grpc.KVStub, rpc: str, request_: object, fragments: list[str]
) -> None:
    await kv.Set(pb.SetRequest(key="witness", value=b"kept"))
    await expect_error(getattr(kv, rpc)(request_), grpc.StatusCode.INVALID_ARGUMENT, *fragments)
    got = await kv.Get(pb.GetRequest(key="witness"))
    assert got.value == b"kept"
    info = await kv.Info(pb.InfoRequest())
    assert info.key_count == 1  # a refused batch wrote nothing


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [(b"\x0a\x02\xff\xfe", "String field had bad UTF-8"), (b"\xff\xff\xff", "Wire format was corrupt")],
)
async def test_malformed_request_is_invalid_argument(
    channel: grpc.aio.Channel, kv: kv_pb2_grpc.KVStub, payload: bytes, fragment: str
) -> None:
    raw_get = channel.unary_unary("/fluxkv.v1.KV/Get", request_serializer=bytes, response_deserializer=bytes)
    await expect_error(raw_get(payload), grpc.StatusCode.INVALID_ARGUMENT, "not a valid fluxkv.v1.GetRequest", fragment)
    assert (await kv.Set(pb.SetRequest(key="k", value=b"v"))).revision == 1


async def test_cursor_from_another_prefix_is_refused(kv: kv_pb2_grpc.KVStub) -> None:
    await kv.MultiSet(pb.MultiSetRequest(items=[pb.SetRequest(key=f"a{i}") for i in range(20)]))
    page = await kv.Scan(pb.ScanRequest(prefix="a", limit=2))
    assert page.cursor
    await expect_error(
        kv.Scan(pb.ScanRequest(prefix="b", cursor=page.cursor)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "another prefix",
    )


@pytest.fixture
async def small_node(grpc_server: str) -> AsyncIterator[kv_pb2_grpc.KVStub]:
    node = Node(
        settings(
            max_key_bytes=100,
            max_value_bytes=10_000,
            max_batch_items=10,
            max_batch_bytes=20_000,
            max_message_bytes=100_000,
        )
    )
    await node.start()
    async with grpc.aio.insecure_channel(node.address) as channel:
        yield kv_pb2_grpc.KVStub(channel)
    await node.stop()


async def test_message_over_grpc_limit_is_refused_by_grpc(small_node: kv_pb2_grpc.KVStub) -> None:
    await expect_error(
        small_node.Set(pb.SetRequest(key="k", value=b"x" * 200_000)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
    )
    assert (await small_node.Set(pb.SetRequest(key="k", value=b"small"))).revision == 1


async def test_multi_get_answer_over_batch_bytes_is_resource_exhausted(small_node: kv_pb2_grpc.KVStub) -> None:
    items = [pb.SetRequest(key=f"k{i}", value=b"x" * 9_000) for i in range(2)]
    await small_node.MultiSet(pb.MultiSetRequest(items=items))
    await small_node.MultiSet(pb.MultiSetRequest(items=[pb.SetRequest(key="k2", value=b"x" * 9_000)]))
    await expect_error(
        small_node.MultiGet(pb.MultiGetRequest(keys=["k0", "k1", "k2"])),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "27000 bytes",
        "FLUX_MAX_BATCH_BYTES",
        "fewer keys",
    )
    assert len((await small_node.MultiGet(pb.MultiGetRequest(keys=["k0", "k1"]))).results) == 2


async def test_scan_pages_stop_at_batch_bytes(small_node: kv_pb2_grpc.KVStub) -> None:
    for i in range(6):
        await small_node.Set(pb.SetRequest(key=f"k{i}", value=b"x" * 9_000))
    sizes = []
    cursor = ""
    while True:
        page = await small_node.Scan(pb.ScanRequest(cursor=cursor, limit=10, include_values=True))
        sizes.append(len(page.items))
        cursor = page.cursor
        if not cursor:
            break
    assert sum(sizes) == 6 and max(sizes) <= 3


# -- service.KVService (Flux-KV) ---------------------------------------------


async def test_compat_set_get_del(compat: compat_kv_pb2_grpc.KVServiceStub, kv: kv_pb2_grpc.KVStub) -> None:
    stub = compat
    assert (await stub.Set(cpb.SetRequest(key="name", value="flüx"))).success
    got = await stub.Get(cpb.GetRequest(key="name"))
    assert (got.value, got.found) == ("flüx", True)
    native = await kv.Get(pb.GetRequest(key="name"))
    assert native.value == "flüx".encode()
    assert (await stub.Del(cpb.DelRequest(key="name"))).success
    assert (await stub.Del(cpb.DelRequest(key="name"))).success
    missing = await stub.Get(cpb.GetRequest(key="name"))
    assert (missing.value, missing.found) == ("", False)


async def test_compat_refuses_binary_values_and_bad_keys(
    compat: compat_kv_pb2_grpc.KVServiceStub, kv: kv_pb2_grpc.KVStub
) -> None:
    await kv.Set(pb.SetRequest(key="bin", value=b"\xff\xfe"))
    await expect_error(
        compat.Get(cpb.GetRequest(key="bin")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "not valid UTF-8",
        "fluxkv.v1.KV/Get",
    )
    await expect_error(
        compat.Set(cpb.SetRequest(key="", value="v")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "key must not be empty",
    )
    assert (await kv.Get(pb.GetRequest(key="bin"))).value == b"\xff\xfe"


# -- deadlines and cancellation ----------------------------------------------


@pytest.mark.usefixtures("grpc_server")
async def test_the_deadline_reaches_the_handler_and_a_cancelled_caller_cancels_it() -> None:
    async with node_whose_writes_wait() as (node, kv):
        assert node.admin is not None
        # The handler waits until just before the caller's deadline, then says why.
        await expect_error(
            kv.Set(pb.SetRequest(key="late", value=b"v"), timeout=1),
            grpc.StatusCode.UNAVAILABLE,
            "the CDC queue is full",
            "did not drain within 0.9",
        )
        # No deadline: the handler waits until the caller goes away.
        waiting = kv.Set(pb.SetRequest(key="cancelled", value=b"v"))
        await writes_waiting(node, 2)
        waiting.cancel()
        assert await waiting.code() == grpc.StatusCode.CANCELLED

        async def handler_cancelled() -> bool:
            page = (await http_get(node.admin.port, "/metrics")).text
            return 'fluxkv_requests_total{method="fluxkv.v1.KV/Set",code="CANCELLED"} 1' in page

        await eventually(handler_cancelled, "the transport counts the cancelled handler")
        # Neither write was applied.
        assert node.store.revision == 1000
        got = await kv.MultiGet(pb.MultiGetRequest(keys=["late", "cancelled"]))
        assert [r.found for r in got.results] == [False, False]


# -- health and reflection ---------------------------------------------------


async def test_an_unknown_method_or_service_is_unimplemented(channel: grpc.aio.Channel) -> None:
    for path in ("/fluxkv.v1.KV/Nope", "/nope.Service/Get"):
        await expect_error(channel.unary_unary(path)(b""), grpc.StatusCode.UNIMPLEMENTED)
    streaming = channel.unary_stream("/fluxkv.v1.KV/NopeStream")(b"")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in streaming:
            pass
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_metadata_up_to_16_kib_is_accepted_and_more_refused(kv: kv_pb2_grpc.KVStub, grpc_server: str) -> None:
    await kv.Set(pb.SetRequest(key="k", value=b"v"), metadata=[("x-large", "a" * 15_000)])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await kv.Set(pb.SetRequest(key="k", value=b"v"), metadata=[("x-large", "a" * 17_000)])
    # pygrpc-native answers HTTP 431, which the client reads as UNKNOWN (README: known differences).
    expected = {"grpcio": grpc.StatusCode.RESOURCE_EXHAUSTED, "native": grpc.StatusCode.UNKNOWN}[grpc_server]
    assert refused.value.code() == expected
    assert (await kv.Get(pb.GetRequest(key="k"))).value == b"v"  # the node serves on


async def test_health_reports_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "fluxkv.v1.KV", "service.KVService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    await expect_error(health.Check(health_pb2.HealthCheckRequest(service="nope")), grpc.StatusCode.NOT_FOUND)


async def test_reflection_lists_and_describes_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask(request: reflection_pb2.ServerReflectionRequest) -> reflection_pb2.ServerReflectionResponse:
        call = stub.ServerReflectionInfo()
        await call.write(request)
        await call.done_writing()
        return await call.read()

    listed = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
    names = {s.name for s in listed.list_services_response.service}
    assert {"fluxkv.v1.KV", "service.KVService", "grpc.health.v1.Health"} <= names
    described = await ask(reflection_pb2.ServerReflectionRequest(file_containing_symbol="fluxkv.v1.KV"))
    assert described.file_descriptor_response.file_descriptor_proto
