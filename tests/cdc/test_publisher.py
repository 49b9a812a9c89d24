"""CDC against a real RabbitMQ: every acknowledged write reaches the queue, in
order, once after deduplication, in both formats; the full-queue policies;
shutdown flush. Also the helpers of the other CDC tests: draining a queue,
deduplicating, and a consumer that reads bodies exactly as Flux-KV's does."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass

import aio_pika
import grpc
import jsonschema
import orjson
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from fluxkv.cdc.events import Event, decode_batch
from fluxkv.core.changes import Op
from fluxkv.proto import kv_pb2 as pb
from fluxkv.proto import kv_pb2_grpc
from tests.conftest import BROKER, ROOT, Names, closed_port, running_node
from tests.obs.test_tracing import node_tracing


@dataclass
class Delivered:
    message: aio_pika.abc.AbstractIncomingMessage
    events: list[Event]


Decode = Callable[[bytes], list[Event]]


@dataclass(frozen=True)
class FluxKvEvent:
    """What Flux-KV's consumer unmarshals a message body into."""

    type: int
    key: str
    value: str | None


def flux_kv_decode(body: bytes) -> FluxKvEvent:
    """Decode a body as Flux-KV's consumer does, and strictly: it must be one
    JSON object with `type` 0 (set) or 1 (delete), a string `key` and `value`,
    a string, or null for a delete (and for a set whose value is not UTF-8,
    which FluxKV adds in `value_b64`)."""
    event = orjson.loads(body)
    assert isinstance(event, dict), f"not one JSON object: {body[:80]!r}"
    kind, key = event.get("type"), event.get("key")
    assert type(kind) is int and kind in (0, 1), f"type {kind!r}: {body[:80]!r}"
    assert isinstance(key, str), f"key {key!r}: {body[:80]!r}"
    assert "value" in event, f"no value: {body[:80]!r}"
    value = event["value"]
    if kind == 1 or value is None:
        assert value is None and (kind == 1) != isinstance(event.get("value_b64"), str), body[:80]
    else:
        assert isinstance(value, str), f"value {value!r}: {body[:80]!r}"
    return FluxKvEvent(kind, key, value)


def as_flux_kv_consumer(body: bytes) -> list[Event]:
    """A body decoded as Flux-KV's consumer does (flux_kv_decode), checked
    against FluxKV's reading of it, which also gives rev, node and epoch."""
    seen = flux_kv_decode(body)
    [event] = decode_batch(body)
    try:
        text = event.value.decode() if event.value is not None else None
    except UnicodeDecodeError:
        text = None  # in value_b64
    assert (seen.type, seen.key, seen.value) == (0 if event.op is Op.SET else 1, event.key, text)
    return [event]


async def drain(url: str, queue: str, decode: Decode = decode_batch) -> list[Delivered]:
    """Every message in `queue` (which nothing publishes to any more), taken off
    it, with its events as `decode` reads them. Consumed rather than fetched one
    by one: with one message per change, a queue can hold thousands."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        count = q.declaration_result.message_count
        assert count is not None
        out: list[Delivered] = []
        if count:
            async with q.iterator(no_ack=True) as messages:
                async for message in messages:
                    out.append(Delivered(message, decode(message.body)))
                    if len(out) == count:
                        break
        return out


Change = tuple[Op, str, bytes | None]
# What each format carries of a change: Flux-KV's knows no expiry.
FORMATS = ("fluxkv", "flux-kv")
DECODERS: dict[str, Decode] = {"fluxkv": decode_batch, "flux-kv": as_flux_kv_consumer}
EXPIRY: dict[str, Op] = {"fluxkv": Op.EXPIRE, "flux-kv": Op.DELETE}


def ttl_key(key: str) -> bool:
    """Whether write_mixed set `key` with a TTL."""
    return key.endswith("/ttl")


def mixed_change(prefix: str, i: int) -> tuple[Change, int]:
    """Write number i of a load of sets, deletes and expiries, and its TTL in
    ms: every tenth write deletes the key of the write before it, another
    tenth sets a key (ttl_key) with a 1 ms TTL, which the node then expires."""
    if i % 10 == 9:
        return (Op.DELETE, f"{prefix}{i - 1}", None), 0
    ttl_ms = 1 if i % 10 == 4 else 0
    key = f"{prefix}{i}" + ("/ttl" if ttl_ms else "")
    value = key.encode() if i % 10 != 6 else b"\xff" + key.encode()  # some values are not UTF-8
    return (Op.SET, key, value), ttl_ms


async def write_mixed(kv: kv_pb2_grpc.KVStub, prefix: str, i: int) -> tuple[int, Change]:
    """Make write number i of mixed_change's load; its revision and change."""
    change, ttl_ms = mixed_change(prefix, i)
    op, key, value = change
    if op is Op.DELETE:
        deleted = await kv.Delete(pb.DeleteRequest(key=key), timeout=30)
        assert deleted.deleted
        return deleted.revision, change
    written = await kv.Set(pb.SetRequest(key=key, value=value, ttl_ms=ttl_ms), timeout=30)
    return written.revision, change


def deduplicated(delivered: list[Delivered]) -> list[Event]:
    seen: set[tuple[str, str, int]] = set()
    out = []
    for d in delivered:
        for e in d.events:
            if (e.node, e.epoch, e.rev) not in seen:
                seen.add((e.node, e.epoch, e.rev))
                out.append(e)
    return out


def unused_port() -> int:
    """A loopback port that nothing listens on (for an unreachable broker)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cdc(names: Names, url: str = BROKER, **overrides: object) -> dict[str, object]:
    return {"rabbitmq_url": url, "cdc_exchange": names.exchange, "cdc_queue": names.queue, **overrides}


@pytest.mark.usefixtures("grpc_server")
async def test_every_acknowledged_change_reaches_the_queue_once_in_revision_order(names: Names) -> None:
    acked: dict[int, tuple[Op, str, bytes | None]] = {}
    async with running_node(**cdc(names, cdc_linger_ms=2)) as (node, kv):
        for i in range(200):
            value = f"value-{i}".encode() if i % 3 else bytes([0xFF, i % 256, 0])  # some not UTF-8
            r = await kv.Set(pb.SetRequest(key=f"k{i % 50}", value=value))
            acked[r.revision] = (Op.SET, f"k{i % 50}", value)
        for i in range(0, 50, 5):
            d = await kv.Delete(pb.DeleteRequest(key=f"k{i}"))
            acked[d.revision] = (Op.DELETE, f"k{i}", None)
        ttl = await kv.Set(pb.SetRequest(key="short-lived", value=b"x", ttl_ms=1))
        acked[ttl.revision] = (Op.SET, "short-lived", b"x")
        await asyncio.sleep(0.01)  # let the TTL pass; the Get below expires the key
        assert not (await kv.Get(pb.GetRequest(key="short-lived"))).found
        epoch = node.store.epoch
        node_id = node.node_id
        final = node.store.revision
    # The node has stopped: its shutdown published and confirmed everything.
    delivered = await drain(BROKER, names.queue)
    schema = orjson.loads((ROOT / "docs" / "cdc-event-v1.schema.json").read_bytes())
    for d in delivered:
        jsonschema.validate(orjson.loads(d.message.body), schema)
    events = deduplicated(delivered)
    assert [e.rev for e in events] == list(range(1, final + 1))
    assert {e.node for e in events} == {node_id} and {e.epoch for e in events} == {epoch}
    for e in events:
        if e.rev in acked:
            assert (e.op, e.key, e.value) == acked[e.rev]
    expired = [e for e in events if e.op is Op.EXPIRE]
    assert [(e.key, e.value) for e in expired] == [("short-lived", None)]
    assert next(e for e in events if e.rev == ttl.revision).expires_at_ms > 0
    first = delivered[0].message
    assert first.content_type == "application/json"
    assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert first.routing_key == node_id
    # Several events share a message, each message in revision order.
    assert len(delivered) < len(events)
    for d in delivered:
        revs = [e.rev for e in d.events]
        assert revs == sorted(revs)


@pytest.mark.usefixtures("grpc_server")
async def test_info_reports_the_publishers_counters(names: Names) -> None:
    async with running_node(**cdc(names)) as (node, kv):
        for i in range(10):
            await kv.Set(pb.SetRequest(key=f"k{i}", value=b"v"))
        assert node.cdc is not None and await node.cdc.flush(10)
        info = await kv.Info(pb.InfoRequest())
    assert info.cdc.enabled and info.cdc.connection == "connected" and info.cdc.full_policy == "block"
    assert (info.cdc.queued, info.cdc.published, info.cdc.confirmed) == (10, 10, 10)
    assert (info.cdc.queue_depth, info.cdc.dropped, info.cdc.confirmed_revision) == (0, 0, 10)
    assert info.epoch and info.revision == 10
    assert any(s.name == "cdc" and s.state == "connected" for s in info.subsystems)


async def test_cdc_off_reports_disabled(kv: kv_pb2_grpc.KVStub) -> None:
    info = await kv.Info(pb.InfoRequest())
    assert not info.cdc.enabled
    assert any(s.name == "cdc" and s.state == "disabled" for s in info.subsystems)


@pytest.mark.usefixtures("grpc_server")
async def test_block_policy_refuses_writes_with_unavailable_when_the_queue_stays_full(names: Names) -> None:
    unreachable = f"amqp://guest:guest@127.0.0.1:{unused_port()}/"
    small = {"max_batch_items": 5, "cdc_queue_events": 10, "cdc_block_timeout_ms": 200, "cdc_flush_timeout_s": 0.1}
    async with running_node(**cdc(names, unreachable, **small)) as (_, kv):
        for i in range(10):
            await kv.Set(pb.SetRequest(key=f"k{i}", value=b"v"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await kv.Set(pb.SetRequest(key="one-too-many", value=b"v"))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "CDC queue is full" in (refused.value.details() or "")
        assert "nothing was written" in (refused.value.details() or "")
        # A call deadline shorter than the block timeout: refused before it, with the reason.
        with pytest.raises(grpc.aio.AioRpcError) as short:
            await kv.Delete(pb.DeleteRequest(key="k1"), timeout=0.1)
        assert short.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not (await kv.Get(pb.GetRequest(key="one-too-many"))).found
        assert (await kv.Get(pb.GetRequest(key="k1"))).found
        info = await kv.Info(pb.InfoRequest())
        assert (info.cdc.queue_depth, info.cdc.writes_refused, info.cdc.dropped) == (10, 2, 0)
        assert info.cdc.connection == "reconnecting"
        assert info.revision == 10


@pytest.mark.usefixtures("grpc_server")
async def test_drop_policy_accepts_writes_and_counts_the_dropped_events(names: Names) -> None:
    unreachable = f"amqp://guest:guest@127.0.0.1:{unused_port()}/"
    small = {"max_batch_items": 5, "cdc_queue_events": 10, "cdc_full_policy": "drop", "cdc_flush_timeout_s": 0.1}
    async with running_node(**cdc(names, unreachable, **small)) as (_, kv):
        for i in range(25):
            await kv.Set(pb.SetRequest(key=f"k{i}", value=b"v"))
        info = await kv.Info(pb.InfoRequest())
    assert (info.revision, info.cdc.queued, info.cdc.dropped, info.cdc.queue_depth) == (25, 10, 15, 10)
    assert info.cdc.writes_refused == 0


@pytest.mark.usefixtures("grpc_server")
async def test_flux_kv_format_publishes_a_message_per_change_and_confirms_them_in_batches(names: Names) -> None:
    exporter = InMemorySpanExporter()
    # No active expiry cycle during the test: the Gets below expire the keys, in calls whose spans their
    # expiries link to. An expiry the background cycle makes links to no call, so its batch has no span.
    quiet = {"expire_interval_ms": 3_600_000}
    async with running_node(node_tracing(exporter, 1.0), **cdc(names, cdc_format="flux-kv"), **quiet) as (node, kv):
        acked = dict([await write_mixed(kv, "k", i) for i in range(20)])
        await asyncio.sleep(0.01)  # let the TTLs pass; reading the keys then expires them
        for _, key, _ in acked.values():
            if ttl_key(key):
                assert not (await kv.Get(pb.GetRequest(key=key))).found
        items = [pb.SetRequest(key=f"m{i}", value=b"v") for i in range(100)]
        await kv.MultiSet(pb.MultiSetRequest(items=items))  # 100 changes at once: published together
        node_id, epoch, final = node.node_id, node.store.epoch, node.store.revision
    delivered = await drain(BROKER, names.queue, as_flux_kv_consumer)
    events = [e for d in delivered for e in d.events]  # one per message; published once, so no duplicates
    assert [e.rev for e in events] == list(range(1, final + 1))
    for e in events:
        if e.rev in acked:
            assert (e.op, e.key, e.value) == acked[e.rev]
        elif e.key.startswith("m"):
            assert (e.op, e.value) == (Op.SET, b"v")
        else:  # an expiry, which Flux-KV's format carries as a delete
            assert e.op is Op.DELETE and ttl_key(e.key)
    for d in delivered:
        m, rev = d.message, d.events[0].rev
        assert (m.content_type, m.delivery_mode, m.routing_key) == ("application/json", 2, node_id)
        assert (m.type, m.app_id, m.message_id) == ("flux-kv", "fluxkv", f"{node_id}/{epoch}/{rev}-{rev}")
    publishes = [s.attributes for s in exporter.get_finished_spans() if s.kind is SpanKind.PRODUCER]
    assert all(a is not None and a["messaging.batch.message_count"] == a["fluxkv.cdc.events"] for a in publishes)
    assert sum(a["fluxkv.cdc.events"] for a in publishes if a is not None) == final
    assert max(a["messaging.batch.message_count"] for a in publishes if a is not None) >= 100


@pytest.mark.usefixtures("grpc_server")
async def test_a_change_weighs_its_keys_utf8_bytes_in_the_queue_and_the_watch_history() -> None:
    # "ключ" is 4 characters and 8 bytes in UTF-8: a Set below weighs 10 bytes, a Delete 9,
    # so a 30-byte queue holds three of them (counted by characters, it would hold a fourth).
    broker = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    overrides = {"rabbitmq_url": broker, "cdc_queue_bytes": 30, "cdc_block_timeout_ms": 100, "cdc_flush_timeout_s": 0.1}
    async with running_node(watch_history_bytes=20, **overrides) as (node, kv):
        assert node.cdc is not None
        await kv.Set(pb.SetRequest(key="ключ1", value=b"v"))
        await kv.MultiSet(pb.MultiSetRequest(items=[pb.SetRequest(key="ключ2", value=b"v")]))
        await kv.Delete(pb.DeleteRequest(key="ключ1"))  # 9 bytes
        assert node.cdc.counters().queue_bytes == 10 + 10 + 9
        with pytest.raises(grpc.aio.AioRpcError) as full:
            await kv.Set(pb.SetRequest(key="ключ3", value=b"v"))
        assert full.value.code() == grpc.StatusCode.UNAVAILABLE and "the CDC queue is full" in str(full.value.details())
        # The watch history holds the last changes that fit in 20 bytes: the MultiSet's and the Delete's.
        info = await kv.Info(pb.InfoRequest())
        watch = next(s.detail for s in info.subsystems if s.name == "watch")
        assert "holds revisions 2 to 3 (2 changes, 19 bytes" in watch, watch
