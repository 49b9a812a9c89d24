"""The CDC consumer: the deduplicator's exactly-once property, and the
CdcConsumer API and the fluxkv-cdc program against a real RabbitMQ, fed with
crafted batches (duplicates, republished ranges, two nodes, two epochs, both
formats in one queue)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deploy.private_servers import RabbitBroker
from fluxkv.cdc.consumer import CdcConsumer, CdcError, PoisonMessageError
from fluxkv.cdc.dedup import WINDOW, Deduplicator
from fluxkv.cdc.events import CONTENT_TYPE, decode_batch, encode_event, encode_flux_kv, join_events
from fluxkv.core.changes import ChangeRecord, Op
from fluxkv.core.store import shard_of
from tests.conftest import BROKER, ROOT, Names

WAIT_S = 30.0

# -- the deduplicator --------------------------------------------------------------


def deliveries(window: int) -> st.SearchStrategy[list[tuple[int, bool, int]]]:
    """Steps of deliveries to three streams: (stream, ahead, distance) jumps
    `distance` revisions ahead of the stream's highest (leaving gaps to fill
    later) or goes back `distance` (less than a window) from it."""
    step = st.tuples(
        st.integers(0, 2),
        st.booleans(),
        st.one_of(st.integers(0, 3), st.integers(0, window - 1), st.integers(window, 3 * window)),
    )
    return st.lists(step, max_size=300)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([8, 64, WINDOW]).flatmap(lambda w: st.tuples(st.just(w), deliveries(w))))
def test_each_revision_is_new_exactly_once_when_reordered_less_than_a_window(
    case: tuple[int, list[tuple[int, bool, int]]],
) -> None:
    window, steps = case
    dedup = Deduplicator(window=window)
    highs = [0, 0, 0]
    seen: set[tuple[int, int]] = set()
    for stream, ahead, distance in steps:
        if ahead or not highs[stream]:
            rev = highs[stream] + max(distance, 1)
        else:
            rev = max(highs[stream] - distance % window, 1)
        highs[stream] = max(highs[stream], rev)
        assert dedup.is_new("node", f"epoch-{stream}", rev) == ((stream, rev) not in seen), (stream, rev)
        seen.add((stream, rev))


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([8, 16, 64, 1024]),
    st.randoms(use_true_random=False),
    st.lists(st.floats(0, 1), min_size=3, max_size=3),
)
def test_each_revision_is_new_exactly_once_in_a_dense_shuffle(
    window: int, rng: random.Random, odds: list[float]
) -> None:
    """Two streams of revisions 1..n, some missing, some twice, each moved
    less than a window from its place (sorted by revision plus a shift below
    the window, so the highest revision seen is always less than a window ahead)."""
    reordered, twice, missing = odds
    deliveries = []
    for stream in range(2):
        for rev in range(1, rng.randint(0, 4 * window) + 1):
            if rng.random() < missing:
                continue
            for _ in range(2 if rng.random() < twice else 1):
                shift = rng.randrange(window) if rng.random() < reordered else 0
                deliveries.append((rev + shift, rev, stream))
    deliveries.sort()
    dedup = Deduplicator(window=window)
    seen: set[tuple[int, int]] = set()
    for _, rev, stream in deliveries:
        assert dedup.is_new("node", f"epoch-{stream}", rev) == ((stream, rev) not in seen), (stream, rev)
        seen.add((stream, rev))


def test_a_revision_a_window_behind_the_highest_counts_as_seen() -> None:
    dedup = Deduplicator(window=64)
    assert dedup.is_new("n", "e", 100)
    assert not dedup.is_new("n", "e", 36)  # 100 - 64: never republished that late
    assert dedup.is_new("n", "e", 37)
    assert dedup.is_new("n", "other epoch", 1) and dedup.is_new("other node", "e", 1)  # their own state


def test_the_least_recently_used_stream_is_forgotten_beyond_max_streams() -> None:
    dedup = Deduplicator(max_streams=2)
    assert dedup.is_new("a", "e", 1) and dedup.is_new("b", "e", 1)
    assert not dedup.is_new("a", "e", 1)  # a is now the most recently used
    assert dedup.is_new("c", "e", 1)  # evicts b
    assert (len(dedup), dedup.evicted) == (2, 1)
    assert not dedup.is_new("a", "e", 1)
    assert dedup.is_new("b", "e", 1)  # forgotten: seen as new again


# -- crafted batches ----------------------------------------------------------------


def event(
    node: str,
    epoch: str,
    rev: int,
    op: Op = Op.SET,
    value: bytes = b"",
    expires_at_ms: int = 0,
    encode: Callable[[ChangeRecord, str, str], bytes] = encode_event,
) -> bytes:
    value = value or f"value {rev}".encode()
    record = ChangeRecord(
        rev, op, f"{node}/{rev}", value if op is Op.SET else None, expires_at_ms, 1_763_800_000_000, 7
    )
    return encode(record, node, epoch)


def flux_kv(node: str, epoch: str, rev: int, op: Op = Op.SET, value: bytes = b"") -> tuple[str, bytes]:
    """(routing key, body) of a message of one change in Flux-KV's format."""
    return node, event(node, epoch, rev, op, value, encode=encode_flux_kv)


def batch(node: str, epoch: str, revs: Iterable[int]) -> tuple[str, bytes]:
    """(routing key, body) of a message with those events."""
    return node, join_events([event(node, epoch, r) for r in revs])


def scenario() -> list[tuple[str, bytes]]:
    """Two nodes, node A in two epochs, with duplicates, republished ranges, a
    later batch ahead of an earlier one, a del, an expire, a TTL and a value
    that is not UTF-8. A message of duplicates writes nothing, so the last one
    brings a new event: a consumer that handed out every expected event has
    then taken every message, and stopping acks them all."""
    b_events = [
        event("B", "b1", 1, expires_at_ms=1_763_800_060_000),
        event("B", "b1", 2, value=b"\xff\x00\xfe"),
        event("B", "b1", 3, Op.DELETE),
        event("B", "b1", 4, Op.EXPIRE),
    ]
    return [
        batch("A", "a1", range(1, 6)),
        ("B", join_events(b_events[:2])),
        batch("A", "a1", range(6, 11)),
        batch("A", "a1", range(6, 11)),  # the same message again
        ("B", join_events(b_events)),  # republished, with two more events
        batch("A", "a1", range(11, 16)),
        batch("A", "a1", range(16, 21)),
        batch("A", "a1", range(11, 21)),  # an unconfirmed range published again
        batch("A", "a1", range(26, 31)),  # refused by the broker: 21-25 come later
        batch("A", "a1", range(21, 31)),
        batch("A", "a2", range(1, 4)),  # node A restarted without its data
        batch("A", "a1", range(28, 31)),  # late duplicates of the old epoch
        batch("A", "a2", [4]),  # last, a new event: once it is out, every message was handled
    ]


def first_arrivals(batches: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    """The events a consumer should hand out: each (node, epoch, rev) once, in arrival order."""
    seen: set[tuple[str, str, int]] = set()
    out = []
    for _, body in batches:
        for e in decode_batch(body):
            if (e.node, e.epoch, e.rev) not in seen:
                seen.add((e.node, e.epoch, e.rev))
                out.append(e.raw)
    return out


# -- the broker --------------------------------------------------------------------


async def declare_like_a_node(names: Names, url: str = BROKER) -> None:
    """Declare the exchange and the queue and bind them, as a node does before publishing."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(names.exchange, aio_pika.ExchangeType.FANOUT, durable=True)
        queue = await channel.declare_queue(names.queue, durable=True)
        await queue.bind(exchange, routing_key="")


async def publish(
    names: Names, batches: Iterable[tuple[str, bytes]], exchange_type: str = "fanout", url: str = BROKER
) -> None:
    """Publish each body as a node does (routing key = node id), with confirms."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(names.exchange, exchange_type, durable=True)
        for node, body in batches:
            message = aio_pika.Message(body, content_type=CONTENT_TYPE, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await exchange.publish(message, routing_key=node)


async def messages_in(queue: str, url: str = BROKER) -> int:
    """How many messages `queue` holds, not counting those delivered and not acked."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


async def wait_until_queue_holds(count: int, queue: str, url: str = BROKER) -> None:
    """Wait until `queue` holds `count` messages: those a closed consumer did
    not ack return to it a moment after it closed."""
    deadline = time.monotonic() + WAIT_S
    while (held := await messages_in(queue, url)) != count:
        assert time.monotonic() < deadline, f"queue {queue} holds {held} messages, not {count}"
        await asyncio.sleep(0.02)


async def wait_until(condition: Callable[[], bool], what: str, log: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}\n{log()}")
        await asyncio.sleep(0.02)


# -- the API -----------------------------------------------------------------------


async def take(consumer: CdcConsumer, count: int) -> list[dict[str, Any]]:
    """`count` events, then stop: the messages they came in are acked."""
    got = []
    async with asyncio.timeout(WAIT_S):
        async for e in consumer:
            got.append(e.raw)
            if len(got) == count:
                consumer.stop()
    return got


@pytest.mark.parametrize("exchange_type", ["fanout", "topic", "direct", "headers"])
async def test_the_api_yields_each_event_once_in_order(names: Names, exchange_type: str) -> None:
    batches = scenario()
    expected = first_arrivals(batches)
    keys = ["A", "B"] if exchange_type == "direct" else None  # the nodes' own bindings, which this test has not
    async with CdcConsumer(
        BROKER, queue=names.queue, exchange=names.exchange, exchange_type=exchange_type, binding_keys=keys
    ) as consumer:
        # Entered: the queue is bound, so what is published now is delivered.
        await publish(names, batches, exchange_type)
        got = await take(consumer, len(expected))
    assert got == expected
    await wait_until_queue_holds(0, names.queue)  # all acked
    odd = next(e for e in got if e["node"] == "B" and e["rev"] == 2)
    assert "value_b64" in odd


async def test_a_message_is_acked_only_once_the_handler_handled_all_its_events(names: Names) -> None:
    await declare_like_a_node(names)
    await publish(names, [batch("A", "a1", range(1, 4)), batch("A", "a1", range(4, 7))])

    class HandlerFailed(Exception):
        pass

    handled = []
    with pytest.raises(HandlerFailed):
        async with CdcConsumer(BROKER, queue=names.queue, exchange=names.exchange, prefetch=1) as consumer:
            async for e in consumer:
                if e.rev == 5:
                    raise HandlerFailed
                handled.append(e.rev)
    assert handled == [1, 2, 3, 4]
    # The second message was not acked: a new consumer gets it again, whole.
    async with CdcConsumer(BROKER, queue=names.queue, exchange=names.exchange) as consumer:
        assert [e["rev"] for e in await take(consumer, 3)] == [4, 5, 6]


async def test_stop_acks_what_was_handed_out_and_leaves_the_rest_in_the_queue(names: Names) -> None:
    # As fluxkv-cdc stopped by SIGTERM right after writing the last new event, before
    # the copies after it (which write nothing) came: they stay in the queue.
    await declare_like_a_node(names)
    new, copy = batch("A", "a1", range(1, 4)), batch("A", "a1", range(1, 4))
    await publish(names, [new, copy, copy])
    dedup = Deduplicator()
    async with CdcConsumer(BROKER, queue=names.queue, exchange=names.exchange, prefetch=1, dedup=dedup) as consumer:
        assert [e["rev"] for e in await take(consumer, 3)] == [1, 2, 3]
    await wait_until_queue_holds(2, names.queue)
    # The next consumer takes them, hands out nothing of theirs, and acks them.
    await publish(names, [batch("A", "a1", [4])])
    async with CdcConsumer(BROKER, queue=names.queue, exchange=names.exchange, dedup=dedup) as consumer:
        assert [e["rev"] for e in await take(consumer, 1)] == [4]
    await wait_until_queue_holds(0, names.queue)


async def test_a_poison_message_raises_and_stays_in_the_queue(names: Names) -> None:
    await declare_like_a_node(names)
    await publish(names, [batch("A", "a1", [1]), ("A", b'[{"v": 2, "op": "set"}]'), batch("A", "a1", [2])])
    got = []
    with pytest.raises(PoisonMessageError, match="schema version 2"):
        async with CdcConsumer(BROKER, queue=names.queue, exchange=names.exchange) as consumer:
            async for e in consumer:
                got.append(e.rev)
    assert got == [1]
    await wait_until_queue_holds(2, names.queue)


async def test_a_refused_login_raises_when_entering(names: Names) -> None:
    with pytest.raises(CdcError, match="refused the login"):
        async with CdcConsumer("amqp://guest:wrong@127.0.0.1:5672/", queue=names.queue, exchange=names.exchange):
            pass


async def test_an_exchange_of_another_type_raises_when_entering(names: Names) -> None:
    await declare_like_a_node(names)  # fanout
    with pytest.raises(CdcError, match="inequivalent arg 'type'"):
        async with CdcConsumer(BROKER, queue=names.queue, exchange=names.exchange, exchange_type="topic"):
            pass


# -- the program -------------------------------------------------------------------


class CdcProcess:
    """A fluxkv-cdc child process; its stdout and stderr lines are collected."""

    def __init__(self, args: list[str], env: Mapping[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "cmd" / "fluxkv-cdc"), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        self.out: list[bytes] = []
        self.err: list[str] = []
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out.append), daemon=True),
            threading.Thread(
                target=self._read, args=(self.proc.stderr, lambda b: self.err.append(b.decode())), daemon=True
            ),
        ]
        for r in self._readers:
            r.start()

    @staticmethod
    def _read(stream: Any, keep: Callable[[bytes], None]) -> None:
        for line in stream:
            keep(line)

    @property
    def log(self) -> str:
        return "".join(self.err)

    async def wait_for_log(self, text: str) -> None:
        await wait_until(
            lambda: text in self.log or self.proc.poll() is not None, f"the log says {text!r}", lambda: self.log
        )
        assert text in self.log, self.log

    async def exit_status(self, sig: int | None = None) -> int:
        """Send `sig` (if given) and wait for the exit."""
        if sig is not None:
            self.proc.send_signal(sig)
        await wait_until(lambda: self.proc.poll() is not None, "fluxkv-cdc exits", lambda: self.log)
        for r in self._readers:
            r.join(5)
        return self.proc.returncode


@contextmanager
def fluxkv_cdc(
    names: Names, *args: str, url: str = BROKER, env: Mapping[str, str] | None = None
) -> Iterator[CdcProcess]:
    process = CdcProcess(["--url", url, "--exchange", names.exchange, "--queue", names.queue, *args], env)
    try:
        yield process
    finally:
        if process.proc.poll() is None:
            process.proc.kill()
            process.proc.wait()


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def line_count(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


async def write_to_file(names: Names, out: Path, count: int) -> CdcProcess:
    """Run fluxkv-cdc --output `out` until the file holds `count` events, then
    stop it with SIGTERM (it must exit 0); returns it, for its log."""
    with fluxkv_cdc(names, "--output", str(out)) as cdc:
        await wait_until(lambda: line_count(out) >= count, f"{count} events are written", lambda: cdc.log)
        assert await cdc.exit_status(signal.SIGTERM) == 0
    return cdc


async def test_the_program_appends_each_event_once_to_the_file_and_stops_on_sigterm(
    names: Names, tmp_path: Path
) -> None:
    batches = scenario()
    expected = first_arrivals(batches)
    await declare_like_a_node(names)
    await publish(names, batches)  # before the consumer starts: the queue keeps them
    out = tmp_path / "events.jsonl"
    cdc = await write_to_file(names, out, len(expected))
    assert lines(out) == expected
    await wait_until_queue_holds(0, names.queue)
    # One log line per lifecycle event, none per event.
    assert [line.split(": ", 1)[1].split(" ")[0] for line in cdc.err] == [
        "appending",
        "consuming",
        "received",
        "stopped;",
    ]
    assert f"stopped; {len(expected)} events written" in cdc.log


async def test_the_program_reads_a_queue_of_both_formats_and_writes_version_1_lines(
    names: Names, tmp_path: Path
) -> None:
    # Node A publishes in fluxkv's format, then restarts with flux-kv and its
    # append-only file publishes 8-15 again in that format; node B publishes
    # in flux-kv's, with a value that is not UTF-8, a delete (twice) and an expiry.
    before = [
        batch("A", "a1", range(1, 11)),
        flux_kv("B", "b1", 1),
        flux_kv("B", "b1", 2, value=b"\xff\x00"),
        *(flux_kv("A", "a1", rev) for rev in range(8, 16)),
        flux_kv("B", "b1", 3, Op.DELETE),
        flux_kv("B", "b1", 3, Op.DELETE),
        flux_kv("B", "b1", 4, Op.EXPIRE),
    ]
    # After a restart of fluxkv-cdc: its file tells which of these it has. New events come last (scenario()).
    after = [flux_kv("A", "a1", 15), flux_kv("B", "b1", 4, Op.EXPIRE), batch("A", "a1", range(14, 18))]
    expected = first_arrivals(before + after)
    assert [(e["node"], e["rev"]) for e in expected] == [
        *(("A", rev) for rev in range(1, 11)),
        ("B", 1),
        ("B", 2),
        *(("A", rev) for rev in range(11, 16)),
        ("B", 3),
        ("B", 4),
        ("A", 16),
        ("A", 17),
    ]
    await declare_like_a_node(names)
    await publish(names, before)
    out = tmp_path / "events.jsonl"
    await write_to_file(names, out, 19)
    await publish(names, after)
    cdc = await write_to_file(names, out, len(expected))
    assert "19 events already there" in cdc.log
    assert lines(out) == expected
    await wait_until_queue_holds(0, names.queue)
    # A Flux-KV event is written as the version-1 event it says: no expiry (a del), no TTL, the key's shard.
    b = {e["rev"]: e for e in expected if e["node"] == "B"}
    common = {"v": 1, "node": "B", "epoch": "b1", "ts_ms": 1_763_800_000_000}
    assert b[1] == {**common, "op": "set", "rev": 1, "shard": shard_of("B/1"), "key": "B/1", "value": "value 1"}
    assert b[2] == {**common, "op": "set", "rev": 2, "shard": shard_of("B/2"), "key": "B/2", "value_b64": "/wA="}
    assert b[4] == {**common, "op": "del", "rev": 4, "shard": shard_of("B/4"), "key": "B/4"}


async def test_the_program_writes_json_lines_to_stdout(names: Names) -> None:
    batches = scenario()
    expected = first_arrivals(batches)
    with fluxkv_cdc(names) as cdc:
        await cdc.wait_for_log("consuming queue")
        await publish(names, batches)
        await wait_until(lambda: len(cdc.out) >= len(expected), "all events are written", lambda: cdc.log)
        assert await cdc.exit_status(signal.SIGINT) == 0
    assert [orjson.loads(line) for line in cdc.out] == expected
    await wait_until_queue_holds(0, names.queue)


async def test_a_restart_after_kill_9_leaves_each_event_once_in_the_file(names: Names, tmp_path: Path) -> None:
    await declare_like_a_node(names)
    # 400 messages of 10 events; every 10th message is published twice.
    batches = []
    for first in range(1, 4001, 10):
        batches.append(batch("A", "a1", range(first, first + 10)))
        if first % 100 == 1:
            batches.append(batches[-1])
    await publish(names, batches)
    out = tmp_path / "events.jsonl"
    # One message at a time, so that the kill lands between a write and its ack now and then.
    with fluxkv_cdc(names, "--output", str(out), "--prefetch", "1") as cdc:
        await wait_until(lambda: line_count(out) >= 1000, "1000 events are written", lambda: cdc.log)
        assert await cdc.exit_status(signal.SIGKILL) == -signal.SIGKILL
    assert line_count(out) < 4000, "the consumer was too quick for this test"
    await write_to_file(names, out, 4000)
    assert [e["rev"] for e in lines(out)] == list(range(1, 4001))
    await wait_until_queue_holds(0, names.queue)


async def test_events_already_in_the_file_are_not_written_again(names: Names, tmp_path: Path) -> None:
    # As after a crash between the fsync and the ack: the file has the events,
    # the queue delivers their messages again.
    batches = scenario()
    expected = first_arrivals(batches)
    out = tmp_path / "events.jsonl"
    out.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in expected[:12]))
    await declare_like_a_node(names)
    await publish(names, batches)
    cdc = await write_to_file(names, out, len(expected))
    assert "12 events already there" in cdc.log
    assert lines(out) == expected


async def test_a_torn_last_line_is_cut_off_and_written_again(names: Names, tmp_path: Path) -> None:
    batches = scenario()
    expected = first_arrivals(batches)
    out = tmp_path / "events.jsonl"
    complete = b"".join(orjson.dumps(e) + b"\n" for e in expected[:5])
    torn = orjson.dumps(expected[5])[:20]
    out.write_bytes(complete + torn)
    await declare_like_a_node(names)
    await publish(names, batches)
    cdc = await write_to_file(names, out, len(expected))
    assert f"5 events already there; cut off a torn last line of {len(torn)} bytes" in cdc.log
    assert lines(out) == expected


async def test_a_file_that_is_not_events_is_refused(names: Names, tmp_path: Path) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("shopping list\n")
    with fluxkv_cdc(names, "--output", str(out)) as cdc:
        assert await cdc.exit_status() == 1
    assert f"{out} line 1 is not a CDC event" in cdc.log
    assert out.read_text() == "shopping list\n"


async def test_a_file_another_process_writes_is_refused(names: Names, tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    with out.open("ab") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        with fluxkv_cdc(names, "--output", str(out)) as cdc:
            assert await cdc.exit_status() == 1
    assert "is being written by another process" in cdc.log


async def test_a_refused_login_exits_1_with_one_clear_line(names: Names, tmp_path: Path) -> None:
    with fluxkv_cdc(names, url="amqp://guest:wrong@127.0.0.1:5672/") as cdc:
        assert await cdc.exit_status() == 1
    assert len(cdc.err) == 1, cdc.log
    assert "refused the login" in cdc.log and "ACCESS_REFUSED" in cdc.log
    assert "wrong" not in cdc.log  # the password is not shown


async def test_a_poison_message_exits_1_after_writing_the_events_before_it(names: Names, tmp_path: Path) -> None:
    await declare_like_a_node(names)
    await publish(names, [batch("A", "a1", [1, 2]), ("A", b"\x00 not JSON")])
    out = tmp_path / "events.jsonl"
    with fluxkv_cdc(names, "--output", str(out)) as cdc:
        assert await cdc.exit_status() == 1
    assert "neither a batch of version-1 CDC events nor a Flux-KV event" in cdc.err[-1] and "not JSON" in cdc.err[-1]
    assert [e["rev"] for e in lines(out)] == [1, 2]
    await wait_until_queue_holds(1, names.queue)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {}, "no broker: give --url or set FLUX_RABBITMQ_URL"),
        (["--url", "http://x"], {}, "invalid --url: expected an amqp:// or amqps:// URL"),
        (["--url", BROKER], {"FLUX_CDC_PREFETCH": "0"}, "invalid FLUX_CDC_PREFETCH"),
        (["--url", BROKER, "--exchange-type", "x-delayed"], {}, "invalid --exchange-type"),
        (["--url", BROKER, "--queue", ""], {}, "invalid --queue: expected a name"),
    ],
)
def test_usage_errors_exit_2(args: list[str], env: dict[str, str], message: str) -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")} | env
    done = subprocess.run(
        [sys.executable, str(ROOT / "cmd" / "fluxkv-cdc"), *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=30,
    )
    assert done.returncode == 2
    assert message in done.stderr


async def test_the_program_survives_a_broker_crash_and_restart(rabbit_broker: RabbitBroker, tmp_path: Path) -> None:
    names = Names(exchange="flux_kv_events", queue="flux_cdc_file_logger")  # a private broker: the defaults
    url = rabbit_broker.url
    await declare_like_a_node(names, url)
    await publish(names, [batch("A", "a1", range(first, first + 10)) for first in range(1, 2001, 10)], url=url)
    out = tmp_path / "events.jsonl"
    # One message at a time: the crash comes with a message written and not acked now and then.
    with fluxkv_cdc(names, "--output", str(out), "--prefetch", "1", url=url) as cdc:
        await wait_until(lambda: line_count(out) >= 500, "500 events are written", lambda: cdc.log)
        await asyncio.to_thread(rabbit_broker.kill)
        await cdc.wait_for_log("lost the connection")
        assert line_count(out) < 2000, "the consumer was too quick for this test"
        await asyncio.to_thread(rabbit_broker.start)
        await wait_until(lambda: cdc.log.count("consuming queue") == 2, "it consumes again", lambda: cdc.log)
        # Published after the restart, and again: the publisher had no confirm for the first copy.
        again = [batch("A", "a1", range(1991, 2011)), batch("A", "a1", range(2011, 2021))]
        # Then a last new event: the copies write nothing, so only its line says they were handled
        # (one consumer gets the queue in order); SIGTERM before that would leave them in the queue.
        await publish(names, [*again, *again, batch("A", "a1", [2021])], url=url)
        await wait_until(lambda: line_count(out) >= 2021, "all events are written", lambda: cdc.log)
        assert await cdc.exit_status(signal.SIGTERM) == 0
    assert [e["rev"] for e in lines(out)] == list(range(1, 2022))
    await wait_until_queue_holds(0, names.queue, url)


async def test_the_program_logs_json_lines_with_flux_log_format(names: Names) -> None:
    with fluxkv_cdc(names, env={"FLUX_LOG_FORMAT": "json"}) as cdc:
        await cdc.wait_for_log('"event":"cdc_connected"')
        assert await cdc.exit_status(signal.SIGTERM) == 0
    entries = [orjson.loads(line) for line in cdc.err]
    assert [e.get("event") for e in entries] == ["cdc_connected", "signal", "stopped"]
    assert all(e["logger"] == "fluxkv.cdc_consumer" and e["level"] == "info" for e in entries)
    assert entries[-1]["events"] == 0


def test_the_program_refuses_an_unknown_log_format(names: Names) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "cmd" / "fluxkv-cdc"), "--url", BROKER],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "FLUX_LOG_FORMAT": "xml"},
    )
    assert result.returncode == 2
    assert "invalid FLUX_LOG_FORMAT: expected one of console, json, got 'xml'" in result.stderr
