"""fluxkv.cluster.etcd_client against a real etcd (deploy/private_servers.py): keys, leases, watches, compaction,
failover, deadlines, and etcd going away and coming back."""

from __future__ import annotations

import asyncio
import os
import re
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from typing import TypeVar

import grpc
import pytest

from deploy.private_servers import EtcdServer, free_port
from fluxkv.cluster.etcd_client import EtcdClient, EtcdCompacted, EtcdError, EtcdUnavailable, WatchEvent
from fluxkv.proto import etcd_api_pb2, etcd_api_pb2_grpc
from fluxkv.security.tls import TLS

TIMEOUT_S = 5.0
WAIT_S = 10.0  # bound on waiting for an event etcd is sure to send
T = TypeVar("T")


@pytest.fixture
async def client(etcd_server: EtcdServer) -> AsyncIterator[EtcdClient]:
    async with EtcdClient([etcd_server.endpoint], TIMEOUT_S) as c:
        yield c


async def next_events(watch: AsyncIterator[list[WatchEvent]], count: int) -> list[WatchEvent]:
    """The watch's next messages, until they hold at least count events."""
    events: list[WatchEvent] = []
    async with asyncio.timeout(WAIT_S):
        while len(events) < count:
            events += await anext(watch)
    return events


async def eventually(call: Callable[[], Awaitable[T]]) -> T:
    """call(), retried while etcd is unavailable (a restarted etcd is found within gRPC's reconnect backoff)."""
    async with asyncio.timeout(WAIT_S):
        while True:
            try:
                return await call()
            except EtcdUnavailable:
                await asyncio.sleep(0.05)


async def compact(server: EtcdServer, revision: int) -> None:
    async with grpc.aio.insecure_channel(server.endpoint) as channel:
        request = etcd_api_pb2.CompactionRequest(revision=revision, physical=True)
        kv = etcd_api_pb2_grpc.KVStub(channel)  # type: ignore[no-untyped-call]  # generated code has no annotations
        await kv.Compact(request, timeout=TIMEOUT_S)


@pytest.mark.parametrize(
    ("endpoint", "error"),
    [
        ("127.0.0.1", "is not host:port, http://host:port or https://host:port"),
        ("unix:///run/etcd.sock", "is not host:port, http://host:port or https://host:port"),
        ("http://127.0.0.1:2379/v3", "is not host:port, http://host:port or https://host:port"),
    ],
)
def test_bad_endpoints_are_refused(endpoint: str, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        EtcdClient([endpoint], TIMEOUT_S)


@pytest.mark.parametrize(
    ("endpoints", "tls"),
    [
        (["http://127.0.0.1:2379"], TLS(ca_file="")),
        (["http://127.0.0.1:2379", "https://127.0.0.1:2380"], None),
    ],
)
def test_plain_text_endpoints_are_refused_when_tls_is_asked_for(endpoints: list[str], tls: TLS | None) -> None:
    with pytest.raises(ValueError, match=re.escape("http:// is plain text, but TLS is asked for")):
        EtcdClient(endpoints, TIMEOUT_S, tls=tls)


async def test_put_get_prefix_delete(client: EtcdClient) -> None:
    r1 = await client.put("svc/b", "2")
    r2 = await client.put("svc/a", "1")
    r3 = await client.put("svc0", "beyond the prefix")  # "svc/" ends where "svc0" begins
    assert r1 < r2 < r3
    assert await client.get_prefix("svc/") == ([("svc/a", "1"), ("svc/b", "2")], r3)
    assert await client.get_prefix("") == ([("svc/a", "1"), ("svc/b", "2"), ("svc0", "beyond the prefix")], r3)

    await client.delete("svc/a")
    await client.delete("svc/absent")  # not an error, and no change
    assert await client.get_prefix("svc/") == ([("svc/b", "2")], r3 + 1)


async def test_lease_kept_alive_then_revoked_takes_its_key(client: EtcdClient) -> None:
    lease = await client.lease_grant(10)
    await client.put("svc/node", "addr", lease=lease)
    assert 0 < await client.lease_keepalive(lease) <= 10

    await client.lease_revoke(lease)
    assert (await client.get_prefix("svc/"))[0] == []
    await client.lease_revoke(lease)  # gone already: not an error
    assert await client.lease_keepalive(lease) == 0


async def test_lease_left_to_expire_takes_its_key_and_keepalive_says_0(client: EtcdClient) -> None:
    lease = await client.lease_grant(1)
    await client.put("svc/node", "addr", lease=lease)
    _, revision = await client.get_prefix("svc/")

    async with aclosing(client.watch_prefix("svc/", revision + 1)) as watch:
        assert await next_events(watch, 1) == [WatchEvent("delete", "svc/node", "", revision + 1)]
    assert await client.lease_keepalive(lease) == 0
    assert await client.get_prefix("svc/") == ([], revision + 1)


async def test_watch_from_after_a_read_sees_every_later_change_in_order(client: EtcdClient) -> None:
    await client.put("svc/a", "1")
    pairs, revision = await client.get_prefix("svc/")
    assert pairs == [("svc/a", "1")]
    # Changes between the read and the watch: the watch replays them.
    await client.put("svc/b", "2")
    await client.put("svc0", "beyond the prefix")
    await client.delete("svc/a")

    async with aclosing(client.watch_prefix("svc/", revision + 1)) as watch:
        replayed = await next_events(watch, 2)
        await client.put("svc/c", "3")
        await client.put("svc/b", "22")
        await client.delete("svc/c")
        live = await next_events(watch, 3)

    assert replayed + live == [
        WatchEvent("put", "svc/b", "2", revision + 1),
        WatchEvent("delete", "svc/a", "", revision + 3),
        WatchEvent("put", "svc/c", "3", revision + 4),
        WatchEvent("put", "svc/b", "22", revision + 5),
        WatchEvent("delete", "svc/c", "", revision + 6),
    ]


async def test_watch_from_a_compacted_revision_raises_compacted(etcd_server: EtcdServer, client: EtcdClient) -> None:
    r1 = await client.put("svc/a", "1")
    r2 = await client.put("svc/a", "2")
    await compact(etcd_server, r2)

    with pytest.raises(EtcdCompacted, match=f"up to revision {r2}") as raised:
        async with aclosing(client.watch_prefix("svc/", r1)) as watch:
            await next_events(watch, 1)
    assert raised.value.compact_revision == r2

    # The way back: read again, watch from the revision after the read.
    _, revision = await client.get_prefix("svc/")
    async with aclosing(client.watch_prefix("svc/", revision + 1)) as watch:
        r3 = await client.put("svc/a", "3")
        assert await next_events(watch, 1) == [WatchEvent("put", "svc/a", "3", r3)]


@pytest.mark.parametrize("end", ["kill", "stop"])
async def test_etcd_gone_is_unavailable_and_back_after_restart(
    etcd_server: EtcdServer, client: EtcdClient, end: str
) -> None:
    written = await client.put("svc/a", "1")
    async with aclosing(client.watch_prefix("svc/", written)) as watch:
        assert await next_events(watch, 1) == [WatchEvent("put", "svc/a", "1", written)]  # the watch is set up
        await asyncio.to_thread(getattr(etcd_server, end))  # SIGKILL or SIGTERM
        with pytest.raises(EtcdUnavailable, match=f"watch of 'svc/' on etcd at {etcd_server.endpoint} broke"):
            await next_events(watch, 1)

    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: client.put("svc/a", "2"),
        lambda: client.lease_keepalive(1),
        lambda: anext(client.watch_prefix("svc/", 0)),
    ]
    for call in calls:
        with pytest.raises(EtcdUnavailable, match=f"etcd is unavailable at {etcd_server.endpoint}: .*refused"):
            await call()

    await asyncio.to_thread(etcd_server.start)  # same ports, same data
    assert await eventually(lambda: client.get_prefix("svc/")) == ([("svc/a", "1")], written)
    assert await client.put("svc/a", "2") == written + 1


async def test_fails_over_to_the_next_endpoint(etcd_server: EtcdServer, client: EtcdClient) -> None:
    endpoints = [f"127.0.0.1:{free_port()}", f"http://{etcd_server.endpoint}"]  # nothing listens on the first
    written = await client.put("svc/a", "1")

    async with EtcdClient(endpoints, TIMEOUT_S) as first_call_watches:
        async with aclosing(first_call_watches.watch_prefix("svc/", written)) as watch:
            assert await next_events(watch, 1) == [WatchEvent("put", "svc/a", "1", written)]

    async with EtcdClient(endpoints, TIMEOUT_S) as first_call_renews:
        lease = await client.lease_grant(10)
        assert await first_call_renews.lease_keepalive(lease) > 0
        assert await first_call_renews.put("svc/b", "2", lease=lease) == written + 1


async def test_an_endpoint_that_never_answers_fails_within_the_deadline() -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        async with EtcdClient([address], 0.3) as client, asyncio.timeout(WAIT_S):
            with pytest.raises(EtcdUnavailable, match=f"{address}: DEADLINE_EXCEEDED"):
                await client.put("svc/a", "1")
            with pytest.raises(EtcdUnavailable, match=f"{address}: no answer"):
                await anext(client.watch_prefix("svc/", 0))


async def test_close_ends_open_calls_and_watches_with_an_error(client: EtcdClient) -> None:
    written = await client.put("svc/a", "1")
    async with aclosing(client.watch_prefix("svc/", written)) as watch:
        assert await next_events(watch, 1) == [WatchEvent("put", "svc/a", "1", written)]  # the watch is set up
        waiting = asyncio.ensure_future(next_events(watch, 1))
        await client.close()
        with pytest.raises(EtcdError, match="the etcd client is closed"):
            await waiting
    with pytest.raises(EtcdError, match="the etcd client is closed"):
        await client.put("svc/a", "2")


@pytest.mark.etcd
def test_etcd_server_helper_leaves_nothing_behind() -> None:
    with EtcdServer() as server:
        pid, base_dir = server.pid, server.base_dir
        assert pid is not None and server.data_dir.is_dir()
    assert not base_dir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
