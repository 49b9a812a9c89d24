"""The client SDK against real nodes in this process, each on an ephemeral port:
routing by the ring, multi-key calls across nodes (request order, chunks within
the nodes' limits), typed errors, retries and deadlines, one channel per node,
scan and watch over every node, and the blocking twin (against nodes served
from another thread, since it blocks the thread that calls it)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Collection, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from fluxkv import (
    Client,
    ConditionFailed,
    DeadlineExceeded,
    FluxKVError,
    InvalidRequest,
    KeyValue,
    NoNodes,
    PermissionDenied,
    Retry,
    SetItem,
    SetResult,
    SyncClient,
    Unauthenticated,
    Unavailable,
    WatchEvent,
)
from fluxkv.client import _error
from fluxkv.cluster.hash_ring import HashRing
from fluxkv.server.node import Node
from tests.conftest import cluster, settings, write_tokens

MIB = 1024 * 1024


class Nodes:
    """A node source the test changes, calling listeners from the thread that changes it, as discovery may."""

    def __init__(self, addresses: Collection[str]) -> None:
        self.addresses = frozenset(addresses)
        self._listeners: list[Callable[[Collection[str]], None]] = []

    def on_change(self, listener: Callable[[Collection[str]], None]) -> None:
        self._listeners.append(listener)

    def set(self, addresses: Collection[str]) -> None:
        self.addresses = frozenset(addresses)
        for listener in self._listeners:
            listener(self.addresses)


async def within(seconds: float, condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# -- routing and the calls --------------------------------------------------------


@pytest.mark.usefixtures("grpc_server")
async def test_each_key_goes_to_its_owner_on_the_ring() -> None:
    async with cluster(3) as c, Client(c.addresses) as client:
        for i in range(60):
            key, value = f"user:{i}", b"v%d" % i
            revision = await client.set(key, value, ttl_ms=600_000)
            owner = c.owner(key)
            stored = owner.store.get(key)
            assert stored is not None and (stored.value, stored.mod_revision) == (value, revision)
            assert all(n.store.get(key) is None for n in c.nodes if n is not owner)
            got = await client.get(key)
            assert got is not None and (got.key, got.value, got.mod_revision) == (key, value, revision)
            assert 0 < got.ttl_ms <= 600_000
        assert all(len(n.store) > 0 for n in c.nodes)
        assert await client.get("absent") is None
        assert (await client.delete("user:1")).deleted is True
        assert c.owner("user:1").store.get("user:1") is None
        assert (await client.delete("user:1")).deleted is False


@pytest.mark.usefixtures("grpc_server")
async def test_multi_calls_split_by_owner_in_chunks_within_the_node_limit_and_keep_request_order() -> None:
    # Nodes that refuse more than 7 keys per call: a batch not split by the client fails.
    async with cluster(3, max_batch_items=7) as c, Client(c.addresses, max_batch_items=7) as client:
        keys = [f"k{i}" for i in range(100)]
        items = [(k, k.encode()) for k in reversed(keys)] + [("k5", b"again")]
        results = await client.multi_set(items)
        assert len(results) == len(items) and all(r.applied and r.created for r in results[:-1])
        for (key, _), result in zip(items[:-1], results[:-1], strict=True):
            stored = c.owner(key).store.get(key)
            assert stored is not None
            assert stored.mod_revision == result.revision or key == "k5"
        last = c.owner("k5").store.get("k5")
        assert last is not None and (last.value, last.mod_revision) == (b"again", results[-1].revision)
        assert results[-1] == SetResult(True, results[-1].revision, False)

        asked = ["k3", "missing", *keys[::-1], "k3"]
        got = await client.multi_get(asked)
        assert [g.key if g else None for g in got] == [k if k != "missing" else None for k in asked]
        assert [g.value for g in got if g] == [
            b"k3",
            *(b"again" if k == "k5" else k.encode() for k in keys[::-1]),
            b"k3",
        ]
        assert await client.multi_get([]) == []


@pytest.mark.usefixtures("grpc_server")
async def test_big_batches_go_in_chunks_of_1000_items_and_8_mib() -> None:
    # One node with the default limits: 1000 items and 8 MiB of keys and values per
    # MultiSet, and per MultiGet answer (which the client meets by asking in halves).
    async with cluster(1) as c, Client(c.addresses) as client:
        items = {f"k{i:04}": b"v" for i in range(2500)} | {f"big{i}": bytes(1_000_000) for i in range(9)}
        results = await client.multi_set(items)
        assert len(results) == 2509 and all(r.applied for r in results)
        got = await client.multi_get(list(items))
        assert [g.value if g else None for g in got] == list(items.values())


@pytest.mark.usefixtures("grpc_server")
async def test_failed_conditions_raise_condition_failed_with_the_current_revision() -> None:
    async with cluster(2) as c, Client(c.addresses) as client:
        first = await client.set("cas", b"a")
        with pytest.raises(ConditionFailed) as info:
            await client.set("cas", b"b", expect_revision=first + 100)
        assert (info.value.revision, info.value.code) == (first, grpc.StatusCode.ABORTED)
        assert info.value.node == c.owner("cas").address
        assert f"not the expected {first + 100}" in str(info.value)
        with pytest.raises(ConditionFailed) as info:
            await client.set("cas", b"b", expect_revision=0)
        assert info.value.revision == first
        second = await client.set("cas", b"b", expect_revision=first)
        with pytest.raises(ConditionFailed) as info:
            await client.delete("cas", expect_revision=first)
        assert info.value.revision == second
        with pytest.raises(ConditionFailed) as info:
            await client.delete("absent", expect_revision=3)
        assert info.value.revision == 0
        assert (await client.delete("cas", expect_revision=second)).deleted is True

        results = await client.multi_set(
            [SetItem("fresh", b"1", expect_revision=0), SetItem("fresh", b"2", expect_revision=0), ("plain", b"3")]
        )
        assert [r.applied for r in results] == [True, False, True]
        assert results[1].revision == results[0].revision  # the key's current revision


def condition_failed(
    message: str, *infos: error_details_pb2.ErrorInfo, details: bytes | None = None
) -> ConditionFailed:
    """What the SDK raises for an ABORTED call whose grpc-status-details-bin holds `infos` (or raw `details`)."""
    status = status_pb2.Status(code=grpc.StatusCode.ABORTED.value[0], message=message)
    for info in infos:
        status.details.add().Pack(info)
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", details or status.SerializeToString()))
    error = _error(grpc.aio.AioRpcError(grpc.StatusCode.ABORTED, grpc.aio.Metadata(), trailing, message), "n1:1")
    assert isinstance(error, ConditionFailed)
    return error


def test_condition_failed_takes_the_revision_from_the_details_not_the_message() -> None:
    mismatch = error_details_pb2.ErrorInfo(
        reason="REVISION_MISMATCH", domain="fluxkv", metadata={"key": "k", "revision": "42"}
    )
    error = condition_failed("someone wrote it first", mismatch)
    assert (error.revision, error.message, error.node) == (42, "someone wrote it first", "n1:1")
    other = error_details_pb2.ErrorInfo(reason="REVISION_MISMATCH", domain="example.com", metadata={"revision": "7"})
    assert condition_failed("key 'k' is at revision 5", other, mismatch).revision == 42
    # Without FluxKV's details the revision is unknown, whatever the message says.
    assert condition_failed("key 'k' is at revision 5").revision is None
    assert condition_failed("key 'k' is at revision 5", other).revision is None
    assert condition_failed("key 'k' is at revision 5", details=b"not a Status").revision is None


@pytest.mark.usefixtures("grpc_server")
async def test_a_refused_request_raises_invalid_request_at_once() -> None:
    async with cluster(2) as c, Client(c.addresses) as client:
        with pytest.raises(InvalidRequest) as info:
            await client.set("big", bytes(MIB + 1))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "FLUX_MAX_VALUE_BYTES" in info.value.message
        with pytest.raises(InvalidRequest):
            await client.get("")
        with pytest.raises(InvalidRequest):
            await client.multi_set([("ok", b"1"), ("", b"2")])
        with pytest.raises(FluxKVError):
            await client.set("ttl", b"v", ttl_ms=-1)


# -- unavailable nodes, retries and deadlines ---------------------------------------------


@pytest.mark.usefixtures("grpc_server")
async def test_a_stopped_node_is_unavailable_after_bounded_retries_or_sooner_with_a_short_deadline() -> None:
    async with cluster(2) as c, Client(c.addresses) as client:
        down, up = c.nodes
        key, other = c.key_on(down), c.key_on(up)
        await client.set(key, b"before")
        await c.stop(down)

        start = time.monotonic()
        with pytest.raises(Unavailable) as info:
            await client.get(key)
        elapsed = time.monotonic() - start
        # Retry(): 4 attempts, waiting 0.05-0.1, 0.1-0.2 and 0.2-0.4 s in between.
        assert (info.value.attempts, info.value.node) == (4, down.address)
        assert 0.35 <= elapsed < 2.0
        assert "gave up after 4 attempts" in str(info.value)

        start = time.monotonic()
        with pytest.raises(Unavailable) as info:
            await client.set(key, b"after", timeout=0.15)
        assert time.monotonic() - start < 0.3
        assert info.value.attempts < 4

        assert await client.set(other, b"still served") > 0
        with pytest.raises(Unavailable):
            await client.multi_get([other, key])


@pytest.mark.usefixtures("grpc_server")
@pytest.mark.parametrize("call", ["set", "multi_set"])
async def test_a_retry_goes_to_the_new_owner_once_the_ring_changes(call: str) -> None:
    async with cluster(2) as c:
        down, up = c.nodes
        source = Nodes(c.addresses)
        key, other = c.key_on(down), c.key_on(up)
        await c.stop(down)
        retry = Retry(attempts=50, backoff_s=0.02, max_backoff_s=0.05)
        async with Client(source, retry=retry, max_batch_items=1) as client:
            # The node leaves the ring while the call retries; the change comes from another thread.
            threading.Timer(0.2, source.set, [[up.address]]).start()
            if call == "set":
                revision = await client.set(key, b"moved")
            else:  # `key` twice: its items are retried in request order, so the later one wins
                results = await client.multi_set([(key, b"first"), (other, b"o"), (key, b"moved")])
                assert all(r.applied for r in results)
                revision = results[2].revision
            stored = up.store.get(key)
            assert stored is not None and (stored.value, stored.mod_revision) == (b"moved", revision)


async def test_a_node_that_never_answers_fails_at_the_deadline() -> None:
    with socket.socket() as silent:  # accepts connections, never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        async with Client(address, timeout=0.3) as client:
            start = time.monotonic()
            with pytest.raises(DeadlineExceeded) as info:
                await client.get("k")
            assert 0.25 <= time.monotonic() - start < 1.5
            assert (info.value.code, info.value.node) == (grpc.StatusCode.DEADLINE_EXCEEDED, address)
            start = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await client.set("k", b"v", timeout=0.05)
            assert time.monotonic() - start < 0.25
            with pytest.raises(DeadlineExceeded):
                async with client.watch("", timeout=0.05):
                    pass


@pytest.mark.usefixtures("grpc_server")
async def test_without_nodes_the_error_says_so_until_the_source_knows_one() -> None:
    with pytest.raises(ValueError, match="node addresses"):
        Client([])
    source = Nodes([])
    async with Client(source, retry=Retry(attempts=3, backoff_s=0.01)) as client:
        with pytest.raises(NoNodes, match="no FluxKV node is known") as info:
            await client.get("k")
        assert info.value.attempts == 3
        with pytest.raises(NoNodes):
            [kv async for kv in client.scan()]
        with pytest.raises(NoNodes):
            async with client.watch():
                pass
        async with cluster(1) as c:
            source.set(c.addresses)  # applied on the client's loop: the call's first attempt may miss it
            assert await client.set("k", b"v") > 0


# -- channels -------------------------------------------------------------------------------


@pytest.mark.usefixtures("grpc_server")
async def test_one_channel_per_node_for_the_clients_life_dropped_when_the_node_leaves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[str] = []
    closed: list[str] = []
    real = grpc.aio.insecure_channel

    def recording(target: str, options: Any = None) -> Any:
        channel = real(target, options=options)
        opened.append(target)
        close = channel.close

        async def recorded_close(grace: float | None = None) -> None:
            closed.append(target)
            await close(grace)

        channel.close = recorded_close
        return channel

    monkeypatch.setattr(grpc.aio, "insecure_channel", recording)
    async with cluster(3) as c:
        source = Nodes(c.addresses)
        client = Client(source)
        assert opened == []  # lazily
        keys = [f"k{i}" for i in range(40)]
        for key in keys:
            await client.set(key, b"v")
            await client.get(key)
        await client.multi_get(keys)
        assert [kv async for kv in client.scan()] != []
        assert sorted(opened) == sorted(c.addresses)

        gone = c.addresses[0]
        source.set(c.addresses[1:])
        await within(5, lambda: closed == [gone])
        for key in keys:
            await client.set(key, b"w")
        assert sorted(opened) == sorted(c.addresses)
        assert all(c.nodes[0].store.get(k) is None or c.nodes[0].store.get(k).value == b"v" for k in keys)

        await client.close()
        assert sorted(closed) == sorted(c.addresses)
        with pytest.raises(RuntimeError, match="closed"):
            await client.get("k")


# -- scan and watch over every node ------------------------------------------------------


@pytest.mark.usefixtures("grpc_server")
async def test_scan_returns_every_key_of_every_node_exactly_once() -> None:
    async with cluster(3) as c, Client(c.addresses) as client:
        users = {f"user:{i:03}": b"u%d" % i for i in range(250)}
        await client.multi_set(users | {f"other:{i}": b"o" for i in range(20)})
        assert all(sum(k.startswith("user:") for k in users if c.owner(k) is n) > 0 for n in c.nodes)
        found = [kv async for kv in client.scan("user:", page_size=7)]
        assert sorted(kv.key for kv in found) == sorted(users)
        assert all(kv.value == users[kv.key] and kv.mod_revision > 0 for kv in found)
        keys_only = [kv async for kv in client.scan("user:", include_values=False)]
        assert sorted(kv.key for kv in keys_only) == sorted(users) and {kv.value for kv in keys_only} == {b""}
        assert len([kv async for kv in client.scan()]) == 270


@pytest.mark.usefixtures("grpc_server")
async def test_scan_pages_with_cursors_cover_every_node_and_a_bad_cursor_is_refused() -> None:
    async with cluster(3) as c, Client(c.addresses) as client:
        users = {f"user:{i:03}": b"u%d" % i for i in range(100)}
        await client.multi_set(users)
        found: list[KeyValue] = []
        cursor, pages = "", 0
        while True:
            page, cursor = await client.scan_page("user:", cursor, limit=9)
            assert len(page) <= 9 and (page or not cursor)  # a page is empty only when the scan is over
            found += page
            pages += 1
            if not cursor:
                break
        assert sorted(kv.key for kv in found) == sorted(users) and len(found) == len(users)
        assert all(kv.value == users[kv.key] for kv in found)
        assert pages >= 100 // 9
        assert await client.scan_page("nothing:") == ([], "")
        for bad in ("{", "bm9kZQ", "A" * 200):
            with pytest.raises(InvalidRequest, match="not a scan cursor"):
                await client.scan_page("user:", bad)


@pytest.mark.usefixtures("grpc_server")
async def test_revisions_and_nodes_name_every_node_and_its_revision() -> None:
    async with cluster(2) as c, Client(c.addresses) as client:
        assert client.nodes == sorted(c.addresses)
        assert await client.revisions() == {a: 0 for a in c.addresses}
        key = c.key_on(c.nodes[1])
        revision = await client.set(key, b"v")
        assert await client.revisions() == {c.addresses[0]: 0, c.addresses[1]: revision}
        deleted = await client.delete(key)
        assert deleted and (deleted.deleted, deleted.revision) == (True, revision + 1)
        missing = await client.delete(key)
        assert not missing and missing.revision == revision + 1  # the node's revision then


@pytest.mark.usefixtures("grpc_server")
async def test_a_token_view_sends_its_own_token_over_the_same_channels(tmp_path: Path) -> None:
    secrets = write_tokens(tmp_path / "tokens.toml", {"writer": ("write", []), "reader": ("read", [])})
    async with cluster(1, auth_tokens_file=str(tmp_path / "tokens.toml")) as c:
        async with Client(c.addresses, token=secrets["reader"]) as client:
            writer = client.with_token(secrets["writer"])
            assert await writer.set("k", b"v") == 1
            with pytest.raises(PermissionDenied):
                await client.set("k", b"v")
            with pytest.raises(Unauthenticated):
                await client.with_token(None).get("k")
            assert (await client.get("k")) is not None
            assert writer._channels is client._channels and len(client._channels) == 1
        with pytest.raises(RuntimeError, match="closed"):
            await writer.get("k")  # closing the client closed its views


@pytest.mark.usefixtures("grpc_server")
async def test_watch_streams_the_changes_of_every_node_tagged_with_the_node() -> None:
    async with cluster(3) as c, Client(c.addresses) as client:
        async with client.watch("w:") as events:
            await client.multi_set({f"w:{i}": b"x" for i in range(30)})
            await client.set("other", b"not watched")
            await client.delete("w:0")
            seen = [await asyncio.wait_for(anext(events), 5) for _ in range(31)]
        assert sorted((e.key, e.op) for e in seen) == sorted(
            [(f"w:{i}", "set") for i in range(30)] + [("w:0", "delete")]
        )
        assert all(e.node == c.owner(e.key).address for e in seen)
        for node in c.addresses:
            revisions = [e.revision for e in seen if e.node == node]
            assert revisions == sorted(revisions) and revisions

        # Resume each node from its first event: the same events again.
        starts = {node: min(e.revision for e in seen if e.node == node) for node in c.addresses}
        async with client.watch("w:", starts) as events:
            again = [await asyncio.wait_for(anext(events), 5) for _ in range(31)]
        assert sorted(again, key=lambda e: (e.node, e.revision)) == sorted(seen, key=lambda e: (e.node, e.revision))

        # A node that shuts down ends the watch with Unavailable.
        async with client.watch("") as events:
            await c.stop(c.nodes[0])
            with pytest.raises(Unavailable) as info:
                await asyncio.wait_for(anext(events), 5)
            assert info.value.node == c.addresses[0]
            with pytest.raises(StopAsyncIteration):
                await anext(events)


@pytest.mark.usefixtures("grpc_server")
async def test_a_watch_from_a_revision_no_longer_held_fails_on_entering() -> None:
    async with cluster(2, watch_history=2) as c, Client(c.addresses) as client:
        node = c.nodes[0]
        for i in range(5):
            await client.set(c.key_on(node, f"h{i}"), b"v")
        with pytest.raises(FluxKVError) as info:
            async with client.watch("", {node.address: 1}):
                pass
        assert (info.value.code, info.value.node) == (grpc.StatusCode.OUT_OF_RANGE, node.address)


# -- the blocking twin ---------------------------------------------------------------------


@contextmanager
def nodes_in_a_thread(count: int) -> Iterator[list[Node]]:
    """Nodes served by an event loop of their own, in another thread."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(30)

    async def start() -> Node:
        node = Node(settings())
        await node.start()
        return node

    nodes: list[Node] = []
    try:
        for _ in range(count):
            nodes.append(run(start()))
        yield nodes
    finally:
        for node in nodes:
            run(node.stop())
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()


@pytest.mark.usefixtures("grpc_server")
def test_the_blocking_twin_does_what_the_client_does() -> None:
    with nodes_in_a_thread(2) as nodes, SyncClient([n.address for n in nodes]) as client:
        ring = HashRing(n.address for n in nodes)
        revision = client.set("a", b"1")
        assert client.get("a") == KeyValue("a", b"1", revision, 0)
        owner = next(n for n in nodes if n.address == ring.owner("a"))
        stored = owner.store.get("a")
        assert stored is not None and stored.mod_revision == revision
        with pytest.raises(ConditionFailed) as info:
            client.set("a", b"2", expect_revision=0)
        assert info.value.revision == revision

        items = {f"k{i}": b"%d" % i for i in range(50)}
        assert all(r.applied for r in client.multi_set(items))
        assert [g.value if g else None for g in client.multi_get(["k7", "nope", "k3"])] == [b"7", None, b"3"]
        assert sorted(kv.key for kv in client.scan("k", page_size=5)) == sorted(items)
        with ThreadPoolExecutor(4) as pool:  # one client, shared by threads
            assert all(pool.map(lambda i: client.set(f"t{i}", b"t") > 0, range(40)))

        with client.watch("w:") as events:
            client.set("w:1", b"x")
            client.delete("w:1")
            stream = iter(events)
            first, second = next(stream), next(stream)
        assert isinstance(first, WatchEvent)
        owner_of_w1 = ring.owner("w:1")
        assert [(e.key, e.op, e.node) for e in (first, second)] == [
            ("w:1", "set", owner_of_w1),
            ("w:1", "delete", owner_of_w1),
        ]
        assert client.delete("a").deleted is True and client.get("a") is None
    with pytest.raises(RuntimeError, match="closed"):
        client.get("a")
    client.close()  # again: nothing
