"""Pure logic of CDC: the event encoding round trip and the queue's bounds,
policies and admission order (no broker involved)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluxkv.cdc_events import SchemaError, decode_batch, encode_event, join_events
from fluxkv.cdc_queue import CdcQueue
from fluxkv.changes import ChangeRecord, Op
from fluxkv.errors import ErrorKind, KVError

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


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "not JSON"),
        (b'{"v": 1}', "not an array"),
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
