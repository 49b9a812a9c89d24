"""Pure logic of CDC: the event encodings (fluxkv's and Flux-KV's) and their
round trips, and the queue's bounds, policies and admission order (no broker
involved)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import NoReturn

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluxkv import config
from fluxkv.cdc.consumer import CdcConsumer
from fluxkv.cdc.events import SchemaError, decode_batch, encode_event, encode_flux_kv, join_events
from fluxkv.cdc.publisher import CdcPublisher
from fluxkv.cdc.queue import CdcQueue
from fluxkv.core.changes import ChangeRecord, Op
from fluxkv.core.errors import ErrorKind, KVError
from fluxkv.core.store import shard_of
from tests.cdc.test_publisher import FluxKvEvent, flux_kv_decode

records = st.builds(
    ChangeRecord,
    revision=st.integers(1, 2**62),
    op=st.sampled_from(Op),
    key=st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=20),
    value=st.binary(max_size=40),
    expires_at_ms=st.integers(0, 2**50),
    ts_ms=st.integers(0, 2**50),
    shard=st.integers(0, 255),
).map(
    lambda r: r._replace(
        value=r.value if r.op is Op.SET else None, expires_at_ms=r.expires_at_ms if r.op is Op.SET else 0
    )
)


@given(st.lists(records, min_size=1, max_size=5))
def test_events_round_trip_any_key_and_value(batch: list[ChangeRecord]) -> None:
    body = join_events([encode_event(r, "node-1", "epoch-1") for r in batch])
    decoded = decode_batch(body)
    assert [(e.rev, e.op, e.key, e.value, e.expires_at_ms, e.ts_ms, e.shard) for e in decoded] == [
        (r.revision, r.op, r.key, r.value, r.expires_at_ms, r.ts_ms, r.shard) for r in batch
    ]
    assert {(e.node, e.epoch) for e in decoded} == {("node-1", "epoch-1")}


def test_a_value_that_is_not_utf8_travels_as_base64_and_text_as_text() -> None:
    text = orjson.loads(encode_event(ChangeRecord(1, Op.SET, "k", "héllo".encode(), 0, 5, 3), "n", "e"))
    binary = orjson.loads(encode_event(ChangeRecord(2, Op.SET, "k", b"\xff\xfe", 0, 5, 3), "n", "e"))
    deleted = orjson.loads(encode_event(ChangeRecord(3, Op.DELETE, "k", None, 0, 5, 3), "n", "e"))
    assert text["value"] == "héllo" and "value_b64" not in text and "expires_at_ms" not in text
    assert binary["value_b64"] == "//4=" and "value" not in binary
    assert "value" not in deleted and "value_b64" not in deleted


@given(records)
def test_a_flux_kv_body_is_what_flux_kvs_consumer_reads_and_fluxkv_reads_back(record: ChangeRecord) -> None:
    body = encode_flux_kv(record, "node-1", "epoch-1")
    try:
        text = record.value.decode() if record.value is not None else None
    except UnicodeDecodeError:
        text = None
    assert flux_kv_decode(body) == FluxKvEvent(0 if record.op is Op.SET else 1, record.key, text)
    [event] = decode_batch(body)
    # An expiry is a delete; the TTL of a set is not carried.
    op = Op.DELETE if record.op is Op.EXPIRE else record.op
    assert (event.rev, event.op, event.key, event.value, event.ts_ms, event.expires_at_ms) == (
        record.revision,
        op,
        record.key,
        record.value,
        record.ts_ms,
        0,
    )
    assert (event.node, event.epoch, event.shard) == ("node-1", "epoch-1", shard_of(record.key))
    # What fluxkv-cdc writes for it: a version-1 event, which reads back as itself.
    assert decode_batch(join_events([orjson.dumps(event.raw)])) == [event]


def test_flux_kv_bodies_of_a_set_a_binary_value_a_delete_and_an_expiry() -> None:
    def body(record: ChangeRecord) -> dict[str, object]:
        decoded = orjson.loads(encode_flux_kv(record, "n", "e"))
        assert isinstance(decoded, dict)
        return decoded

    extras = {"node": "n", "epoch": "e", "ts_ms": 5}
    assert body(ChangeRecord(1, Op.SET, "k", "héllo".encode(), 9_000, 5, 3)) == {
        "type": 0,
        "key": "k",
        "value": "héllo",
        "rev": 1,
        **extras,
    }
    assert body(ChangeRecord(2, Op.SET, "k", b"\xff\xfe", 0, 5, 3)) == {
        "type": 0,
        "key": "k",
        "value": None,
        "rev": 2,
        **extras,
        "value_b64": "//4=",
    }
    for rev, op in ((3, Op.DELETE), (4, Op.EXPIRE)):
        assert body(ChangeRecord(rev, op, "k", None, 0, 5, 3)) == {
            "type": 1,
            "key": "k",
            "value": None,
            "rev": rev,
            **extras,
        }


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"type": 2, "key": "k", "value": null}', "type 2; expected 0 .set. or 1 .delete."),
        (b'{"type": 1.0, "key": "k", "value": null}', "type 1.0; expected"),
        (b'{"type": 0, "key": "k", "value": "v"}', "lacks FluxKV's rev, node, epoch, ts_ms, without which"),
        (b'{"type": 0, "key": "k", "value": "v", "rev": 1, "node": "n", "ts_ms": 0}', "lacks FluxKV's epoch"),
        (b'{"type": 0, "key": 7, "value": "v", "rev": 1, "node": "n", "epoch": "e", "ts_ms": 0}', "key should be"),
        (b'{"type": 0, "key": "k", "value": null, "rev": 1, "node": "n", "epoch": "e", "ts_ms": 0}', "needs a value"),
        (b'{"type": 1, "key": "k", "value": "v", "rev": 1, "node": "n", "epoch": "e", "ts_ms": 0}', "must not have"),
        (b'{"type": 0, "key": "k", "value": "v", "rev": "1", "node": "n", "epoch": "e", "ts_ms": 0}', "'rev' should"),
    ],
)
def test_a_flux_kv_body_fluxkv_cannot_read_is_refused_with_the_reason(body: bytes, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        decode_batch(body)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "not JSON"),
        (b'{"v": 1}', "neither an array of events nor a Flux-KV event"),
        (b"[1]", "event 0 is a JSON int"),
        (b'[{"v": 2, "op": "set"}]', "schema version 2"),
        (
            b'[{"v": 1, "op": "set", "node": "n", "epoch": "e", "rev": 1, "shard": 0, "ts_ms": 0, "key": "k"}]',
            "needs a value",
        ),
        (
            b'[{"v": 1, "op": "del", "node": "n", "epoch": "e", "rev": 1, "shard": 0, "ts_ms": 0}]',
            "lacks the field 'key'",
        ),
        (b'[{"v": 1, "op": "put", "node": "n"}]', "'put' is not a valid Op"),
        (
            b'[{"v": 1, "op": "del", "node": "n", "epoch": "e", "rev": "1", "shard": 0, "ts_ms": 0, "key": "k"}]',
            "'rev' should be a int",
        ),
    ],
)
def test_a_body_that_breaks_the_schema_is_refused_with_the_reason(body: bytes, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        decode_batch(body)


def record(rev: int, value: bytes = b"v") -> ChangeRecord:
    return ChangeRecord(rev, Op.SET, "k", value, 0, 0, 0)


def no_deadline() -> float | None:
    return None


def test_drop_policy_drops_what_does_not_fit_and_counts_it() -> None:
    q = CdcQueue(max_events=3, max_bytes=1000, policy="drop", block_timeout_ms=0)
    for rev in range(1, 6):
        q.append(record(rev))
    assert (q.depth, q.queued, q.dropped) == (3, 3, 2)
    assert [q.take().revision for _ in range(q.pending)] == [1, 2, 3]
    q.release(3, 6)
    q.append(record(6))
    assert (q.depth, q.dropped) == (1, 2)


def test_drop_policy_also_bounds_bytes() -> None:
    q = CdcQueue(max_events=100, max_bytes=10, policy="drop", block_timeout_ms=0)
    q.append(record(1, b"12345678"))  # 9 bytes with its key
    q.append(record(2, b"12"))
    assert (q.depth, q.held_bytes, q.dropped) == (1, 9, 1)


async def test_block_policy_admits_while_there_is_room_and_refuses_after_the_timeout() -> None:
    q = CdcQueue(max_events=2, max_bytes=1000, policy="block", block_timeout_ms=20)
    await q.admit(2, 4, no_deadline)
    q.append(record(1))
    q.append(record(2))
    with pytest.raises(KVError) as refused:
        await q.admit(1, 2, no_deadline)
    assert refused.value.kind is ErrorKind.UNAVAILABLE
    assert "FLUX_CDC_QUEUE_EVENTS 2" in refused.value.message
    assert (q.writes_delayed, q.writes_refused) == (1, 1)


async def test_block_policy_answers_before_the_callers_deadline() -> None:
    q = CdcQueue(max_events=1, max_bytes=1000, policy="block", block_timeout_ms=60_000)
    q.append(record(1))
    with pytest.raises(KVError, match=r"within 0\.0\d\d s"):
        await q.admit(1, 2, lambda: 0.05)


async def test_waiting_writes_get_room_in_arrival_order_as_confirms_release_it() -> None:
    q = CdcQueue(max_events=2, max_bytes=1000, policy="block", block_timeout_ms=10_000)
    q.append(record(1))
    q.append(record(2))
    order: list[str] = []

    async def write(name: str, events: int) -> None:
        await q.admit(events, 2 * events, no_deadline)
        order.append(name)
        for _ in range(events):
            q.append(record(0))

    big = asyncio.create_task(write("big", 2))
    await asyncio.sleep(0)
    small = asyncio.create_task(write("small", 1))
    await asyncio.sleep(0)
    q.release(1, 2)  # room for one: "small" fits but must not overtake "big"
    await asyncio.sleep(0)
    assert order == []
    q.release(1, 2)
    await big
    assert order == ["big"]
    assert not small.done()
    q.release(2, 4)
    await small
    assert order == ["big", "small"] and q.depth == 1


async def test_a_cancelled_waiter_lets_the_next_one_in() -> None:
    q = CdcQueue(max_events=2, max_bytes=1000, policy="block", block_timeout_ms=10_000)
    q.append(record(1))
    q.append(record(2))
    first = asyncio.create_task(q.admit(2, 4, no_deadline))
    await asyncio.sleep(0)
    second = asyncio.create_task(q.admit(1, 2, no_deadline))
    await asyncio.sleep(0)
    q.release(1, 2)  # room for "second", which waits behind "first"
    await asyncio.sleep(0)
    assert not second.done()
    first.cancel()  # e.g. the caller went away
    await second
    assert first.cancelled()


async def connect_losing_the_cancellation(*args: object, **kwargs: object) -> NoReturn:
    """aio_pika.connect as aiormq can behave: a cancellation that arrives as
    its own connect task ends is lost, and the caller sees the error."""
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(0)  # where the cancellation is delivered, and lost
    raise ConnectionRefusedError("connection refused")


async def test_the_publisher_stops_when_a_connect_loses_its_cancellation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fluxkv.cdc.publisher.aio_pika.connect", connect_losing_the_cancellation)
    queue = CdcQueue(max_events=10, max_bytes=1000, policy="drop", block_timeout_ms=0)
    publisher = CdcPublisher(queue, config.Settings(rabbitmq_url="amqp://guest:guest@127.0.0.1:1/"))
    run = asyncio.create_task(publisher.run("node", "epoch"))
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(30):  # else it retries forever: TimeoutError
            await run
    assert run.cancelled()


async def test_the_consumer_stops_when_a_connect_loses_its_cancellation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("fluxkv.cdc.consumer.aio_pika.connect", connect_losing_the_cancellation)
    consumer = CdcConsumer("amqp://guest:guest@127.0.0.1:1/")
    run = asyncio.create_task(consumer._connect_forever())  # what `async with consumer` starts and close() cancels
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(30):  # else it retries forever: TimeoutError
            await run
    assert run.cancelled()
