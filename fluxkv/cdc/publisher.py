"""The CDC publisher: takes change records from the CdcQueue, batches them into
AMQP messages and publishes them to RabbitMQ with publisher confirms.

- A batch of consecutive events is published once it holds
  FLUX_CDC_BATCH_BYTES of events, or once FLUX_CDC_LINGER_MS have passed since
  the previous batch: under load the node sends one batch per linger interval,
  so events per batch grow with the write rate, while an event after a quiet
  interval leaves at once.
- A batch is one message, the JSON array of its events (FLUX_CDC_FORMAT
  fluxkv), or one message per event in Flux-KV's body (flux-kv; cdc_events).
  Each message costs a fixed amount of CPU, mostly its socket write, so the
  fluxkv format is the cheap one. A batch's messages are all published, then
  their confirms awaited together; the batch is confirmed once all of them are.
- Up to FLUX_CDC_MAX_IN_FLIGHT batches await their confirms at once; they are
  written to one channel in revision order. Records leave the queue (making
  room for writes) only once the broker has confirmed them.
- When the connection fails, or the broker refuses a message, the publisher
  reconnects with jittered exponential backoff and publishes every unconfirmed batch
  again, oldest first, before anything new: delivery is at least once, and a
  consumer that drops (node, epoch, rev) it has seen gets every event in order.
- With the append-only file on, it is the publisher's change log (ChangeLog):
  the publisher publishes a change only once the log's readable revision has
  reached it (the file holds it as durably as FLUX_AOF_APPEND_FSYNC promises),
  keeps the revision the broker confirmed in a checkpoint of its own
  (cdc_checkpoint), at which it holds the log's retention floor, and reads from
  the log whatever is not in the queue: the changes after the checkpoint at
  start-up, and those the full queue spilled. No acknowledged write is then
  missing from the stream, even after a crash.
- With tracing on, publishing a batch that carries sampled writes is a
  PRODUCER span, from the publish to the broker's confirm, linked to those
  writes' spans (fluxkv/obs/tracing.py, WriteLinks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import aio_pika
import aiormq
from aio_pika.abc import AbstractConnection
from opentelemetry.trace import Span, SpanContext, Status, StatusCode

from fluxkv.cdc import amqp
from fluxkv.cdc import events as cdc_events
from fluxkv.cdc.checkpoint import CHECKPOINT_INTERVAL_S, Checkpoint
from fluxkv.cdc.queue import CdcQueue
from fluxkv.config import Settings, redact_url
from fluxkv.core.backoff import Backoff, stop_if_cancelling
from fluxkv.core.changes import ChangeRecord, record_bytes
from fluxkv.obs.metrics import Family, counter, gauge, states
from fluxkv.obs.tracing import Tracing
from fluxkv.security.tls import TLS

log = logging.getLogger("fluxkv.cdc")

RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0
CONNECT_TIMEOUT_S = 10.0
# Per-event JSON overhead beyond key and value, to tell when a batch is full.
_EVENT_OVERHEAD = 120
# At most one log line about dropped events per this many seconds.
_DROP_REPORT_INTERVAL_S = 10.0
CONNECTION_STATES = ("connecting", "connected", "reconnecting")


class RetentionHold(Protocol):
    """A reader's floor in a change log: the log keeps every change after
    `revision`; the reader raises it as it goes."""

    revision: int


class ChangeLog(Protocol):
    """What the publisher needs of a change log (fluxkv.aof.file.AppendOnlyFile).
    The log calls nothing back: the publisher keeps its own offset."""

    @property
    def last_revision(self) -> int:
        """The revision of the last change appended."""
        ...

    @property
    def readable_revision(self) -> int:
        """Every change up to this revision may be read and published: a
        restart will not give its revision to another change."""
        ...

    async def wait_past(self, revision: int) -> None:
        """Return once readable_revision is above `revision`."""
        ...

    def read_changes(self, after: int, until: int, max_bytes: int) -> list[ChangeRecord]:
        """The changes after revision `after` up to `until` (about max_bytes
        of keys and values at most), in order. Blocking: call it in a thread."""
        ...

    def hold(self, revision: int) -> RetentionHold:
        """Keep every change after `revision` until the hold is raised (taken
        before the log takes writes)."""
        ...


@dataclass(frozen=True)
class CdcCounters:
    """A snapshot of the publisher's state, in events (fields as CdcStatus)."""

    connection: str
    full_policy: str
    queued: int
    published: int
    confirmed: int
    republished: int
    dropped: int
    queue_depth: int
    queue_bytes: int
    writes_delayed: int
    writes_refused: int
    confirmed_revision: int
    spilled: int


class _Batch:
    __slots__ = ("confirmed", "events", "first", "held", "last", "links", "messages", "nbytes", "publish", "span")

    def __init__(
        self,
        first: int,
        last: int,
        events: int,
        nbytes: int,
        messages: list[tuple[str, bytes]],
        links: list[SpanContext],
        held: bool = True,
    ) -> None:
        self.first = first
        self.last = last
        self.events = events
        # Whether its events count against the queue's bounds (not when read
        # from the append-only file), and their bytes there.
        self.held = held
        self.nbytes = nbytes
        self.messages = messages  # (message id, body) of each message, in order
        self.confirmed = False
        self.publish: asyncio.Future[Any] | None = None
        self.links = links  # span contexts of the sampled writes it carries
        self.span: Span | None = None  # the publish in progress, with tracing on


class CdcPublisher:
    """With `change_log` (the append-only file), its checkpoint is the file
    <FLUX_AOF_FILENAME>.cdc-checkpoint: resume() reads it before the node
    serves, run() keeps it, close() writes it last."""

    def __init__(
        self,
        queue: CdcQueue,
        settings: Settings,
        change_log: ChangeLog | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self._queue = queue
        self._change_log = change_log
        self._tracing = tracing
        # With a change log: the revision to publish next, the last one that
        # flush() waits for, the checkpoint and the floor held at it.
        self._next = 0
        self._flush_target = 0
        self._checkpoint: Checkpoint | None = None
        if change_log is not None:
            self._checkpoint = Checkpoint(settings.aof_filename + ".cdc-checkpoint")
        self._hold: RetentionHold | None = None
        self._confirmed_more = asyncio.Event()  # the checkpoint keeper's cue
        self._url = settings.rabbitmq_url
        tls = TLS(settings.rabbitmq_ca_file, settings.rabbitmq_cert_file, settings.rabbitmq_key_file)
        self._ssl_context = amqp.ssl_context(self._url, tls)
        self._exchange_name = settings.cdc_exchange
        self._exchange_type = aio_pika.ExchangeType(settings.cdc_exchange_type)
        self._queue_name = settings.cdc_queue
        self._batch_bytes = settings.cdc_batch_bytes
        self._linger = settings.cdc_linger_ms / 1000
        self._max_in_flight = settings.cdc_max_in_flight
        self._per_event = settings.cdc_format == "flux-kv"
        self._encode = cdc_events.encode_flux_kv if self._per_event else cdc_events.encode_event
        self._message_type = "flux-kv" if self._per_event else f"fluxkv.cdc.v{cdc_events.SCHEMA_VERSION}"
        self._node = ""
        self._epoch = ""
        # Published batches in revision order, until confirmed and released.
        self._in_flight: deque[_Batch] = deque()
        self._connection: AbstractConnection | None = None
        self._failure: BaseException | None = None
        # What the pump awaits: an append, a confirm it needs, a failure, a timer.
        self._wakeup: asyncio.Future[None] | None = None
        self._window_full = False
        self._drained: asyncio.Future[None] | None = None
        self._flushing = False
        self.connection = "connecting"
        self.last_error = ""  # why the last connection failed, while not connected
        self.published = 0
        self.confirmed = 0
        self.republished = 0
        self.confirmed_revision = 0
        self._dropped_reported = 0
        self._drops_reported_at = 0.0

    def counters(self) -> CdcCounters:
        q = self._queue
        return CdcCounters(
            connection=self.connection,
            full_policy=q.policy,
            queued=q.queued,
            published=self.published,
            confirmed=self.confirmed,
            republished=self.republished,
            dropped=q.dropped,
            queue_depth=q.depth,
            queue_bytes=q.held_bytes,
            writes_delayed=q.writes_delayed,
            writes_refused=q.writes_refused,
            confirmed_revision=self.confirmed_revision,
            spilled=q.spilled,
        )

    def collect(self) -> list[Family]:
        """The publisher's metrics, for the node's registry."""
        c = self.counters()
        return [
            states(
                "fluxkv_cdc_connection",
                "The CDC publisher's connection to the broker: 1 for its state now.",
                c.connection,
                CONNECTION_STATES,
            ),
            counter("fluxkv_cdc_events_queued_total", "Change events put in the CDC queue.", c.queued),
            counter("fluxkv_cdc_events_published_total", "Change events published (the first time).", c.published),
            counter("fluxkv_cdc_events_confirmed_total", "Change events the broker confirmed.", c.confirmed),
            counter(
                "fluxkv_cdc_events_republished_total",
                "Change events published again after a lost connection or a nack.",
                c.republished,
            ),
            counter(
                "fluxkv_cdc_events_dropped_total",
                "Change events dropped because the CDC queue was full (FLUX_CDC_FULL_POLICY=drop).",
                c.dropped,
            ),
            gauge(
                "fluxkv_cdc_queue_events", "Change events held between a write and the broker's confirm.", c.queue_depth
            ),
            gauge("fluxkv_cdc_queue_bytes", "Key and value bytes of the change events held.", c.queue_bytes),
            counter(
                "fluxkv_cdc_writes_delayed_total",
                "Writes that waited for room in the full CDC queue (FLUX_CDC_FULL_POLICY=block).",
                c.writes_delayed,
            ),
            counter(
                "fluxkv_cdc_writes_refused_total",
                "Writes refused with UNAVAILABLE because the CDC queue stayed full.",
                c.writes_refused,
            ),
            gauge(
                "fluxkv_cdc_confirmed_revision",
                "Revision up to which the broker confirmed every change event.",
                c.confirmed_revision,
            ),
            counter(
                "fluxkv_cdc_events_spilled_total",
                "Change events the full CDC queue left to be read back from the append-only file.",
                c.spilled,
            ),
        ]

    def describe(self) -> str:
        c = self.counters()
        failed = f" ({self.last_error})" if self.last_error and c.connection != "connected" else ""
        text = (
            f"{c.connection} to {redact_url(self._url)}{failed}, exchange {self._exchange_name!r}; "
            f"{c.queue_depth} events held, {c.confirmed} confirmed up to revision {c.confirmed_revision}, "
            f"{c.republished} republished, {c.dropped} dropped"
        )
        if self._checkpoint is not None:
            text += f"; checkpoint at revision {self._checkpoint.revision}"
        return text

    @property
    def checkpoint_revision(self) -> int:
        """The revision the checkpoint file holds (0 without a change log)."""
        return self._checkpoint.revision if self._checkpoint is not None else 0

    # -- lifetime ------------------------------------------------------------

    async def resume(self, epoch: str) -> None:
        """With a change log: read the checkpoint (or write one at the log's
        end), hold the log there, and publish from after it. Call it once the
        log is open, before it takes writes."""
        change_log, checkpoint = self._change_log, self._checkpoint
        assert change_log is not None and checkpoint is not None
        self.confirmed_revision = await asyncio.to_thread(checkpoint.load, epoch, change_log.readable_revision)
        self._next = self.confirmed_revision + 1
        self._hold = change_log.hold(checkpoint.revision)
        if change_log.readable_revision >= self._next:
            log.info(
                "CDC resumes after revision %d (the checkpoint): %d changes to publish from the append-only file",
                self.confirmed_revision,
                change_log.readable_revision - self.confirmed_revision,
            )

    async def run(self, node_id: str, epoch: str) -> None:
        """Publish until cancelled, reconnecting whenever the broker is lost;
        with a change log, keep the checkpoint meanwhile."""
        self._node, self._epoch = node_id, epoch
        async with asyncio.TaskGroup() as tasks:
            if self._checkpoint is not None:
                tasks.create_task(self._keep_checkpoint(self._checkpoint), name="fluxkv-cdc-checkpoint")
            await self._publish()

    async def close(self) -> None:
        """Checkpoint the last confirmed revision, once run() has stopped."""
        if self._checkpoint is not None:
            await self._save_checkpoint(self._checkpoint)

    async def _publish(self) -> None:
        where = redact_url(self._url)
        backoff = Backoff(RECONNECT_MIN_S, RECONNECT_MAX_S)
        while True:
            connection: AbstractConnection | None = None
            try:
                connection = await amqp.connect(self._url, self._ssl_context, CONNECT_TIMEOUT_S)
                channel = await self._declare(connection)
                stop_if_cancelling()
                self.connection = "connected"
                log.info(
                    "CDC connected to %s: publishing to exchange %r (%s)%s",
                    where,
                    self._exchange_name,
                    self._exchange_type.value,
                    f", {len(self._in_flight)} unconfirmed batches to publish again" if self._in_flight else "",
                    extra={"event": "cdc_connected"},
                )
                backoff.reset()
                self.last_error = ""
                await self._pump(connection, channel)
            except Exception as exc:
                stop_if_cancelling()
                error = amqp.failure(exc)
                if self.connection == "connected":
                    log.warning(
                        "CDC lost the broker at %s (%s); reconnecting, %d events held",
                        where,
                        error,
                        self._queue.depth,
                        extra={"event": "cdc_lost"},
                    )
                elif error != self.last_error:
                    log.warning(
                        "CDC cannot reach the broker at %s (%s); retrying",
                        where,
                        error,
                        extra={"event": "cdc_unreachable"},
                    )
                self.last_error = error
                self.connection = "reconnecting"
            finally:
                self._abandon_unconfirmed()
                if connection is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(connection.close(), CONNECT_TIMEOUT_S)
            self._report_drops()
            await asyncio.sleep(backoff.next_delay())

    async def flush(self, timeout: float) -> bool:
        """Publish what is queued now, without lingering, and wait until the
        broker confirmed all of it or `timeout` passed; True if it did."""
        self._flushing = True
        if self._change_log is not None:
            self._flush_target = self._change_log.last_revision
        self._wake()
        if self._is_drained():
            return True
        self._drained = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._drained), timeout)
        except TimeoutError:
            return False
        return True

    # -- publishing ------------------------------------------------------------

    async def _declare(self, connection: AbstractConnection) -> aiormq.Channel:
        """Declare the exchange (and the queue); the channel to publish on."""
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(self._exchange_name, self._exchange_type, durable=True)
        if self._queue_name:
            queue = await channel.declare_queue(self._queue_name, durable=True)
            await queue.bind(exchange, routing_key=self._node)
        # aiormq's own channel: its basic_publish can skip waiting for each
        # frame's socket write (wait=False) and only await the confirm.
        underlay = await channel.get_underlay_channel()
        assert isinstance(underlay, aiormq.Channel)
        return underlay

    async def _pump(self, connection: AbstractConnection, channel: aiormq.Channel) -> None:
        """Publish until the connection fails (raises the failure)."""
        self._failure = None
        self._connection = connection
        connection.close_callbacks.add(self._on_connection_closed)
        for batch in self._in_flight:  # not confirmed when the last connection ended
            if not batch.confirmed:
                self._send(channel, batch, again=True)
        queue = self._queue
        loop = asyncio.get_running_loop()
        last_sent = -self._linger
        while self._failure is None:
            timeout: float | None = None
            self._window_full = False
            source = self._source()
            if source is not None and len(self._in_flight) >= self._max_in_flight:
                self._window_full = True  # a confirm wakes us
            elif source == "file":
                batch = await self._file_batch()
                if self._failure is None:
                    self._send(channel, batch, again=False)
                    last_sent = loop.time()
                continue
            elif source == "memory":
                now = loop.time()
                full = queue.pending_bytes + _EVENT_OVERHEAD * queue.pending >= self._batch_bytes
                if full or self._flushing or now >= last_sent + self._linger:
                    self._send(channel, self._next_batch(), again=False)
                    last_sent = now
                    continue
                timeout = last_sent + self._linger - now
            self._report_drops()
            wakeup = self._wakeup = loop.create_future()
            if not queue.pending:
                queue.wake_on_append(wakeup)
            readable = self._when_readable(wakeup) if source is None else None
            timer = loop.call_later(timeout, _resolve, wakeup) if timeout is not None else None
            await wakeup
            if timer is not None:
                timer.cancel()
            if readable is not None:
                readable.cancel()
        raise self._failure

    def _source(self) -> str | None:
        """Where the next change to publish is: "memory" (the queue), "file"
        (the AOF), or None (nothing to publish yet)."""
        queue = self._queue
        change_log = self._change_log
        if change_log is None:
            return "memory" if queue.pending else None
        if self._next > change_log.readable_revision:
            return None  # not readable yet: not in the file as durably as its policy promises
        return "memory" if queue.next_revision == self._next else "file"

    def _when_readable(self, wakeup: asyncio.Future[None]) -> asyncio.Task[None] | None:
        """A task that completes `wakeup` once the change log's readable
        revision reaches the next change to publish, if the log has that
        change (else the queue's next append wakes the pump)."""
        change_log = self._change_log
        if change_log is None or self._next > change_log.last_revision:
            return None
        task = asyncio.ensure_future(change_log.wait_past(self._next - 1))
        task.add_done_callback(lambda _: _resolve(wakeup))
        return task

    async def _file_batch(self) -> _Batch:
        """The changes from self._next on that the queue does not hold, read from the change log."""
        change_log = self._change_log
        assert change_log is not None
        until = change_log.readable_revision
        if self._queue.pending:
            until = min(until, self._queue.next_revision - 1)
        records = await asyncio.to_thread(change_log.read_changes, self._next - 1, until, self._batch_bytes)
        if not records or records[0].revision != self._next:
            raise RuntimeError(f"the append-only file lacks revision {self._next}, which CDC must publish")
        node, epoch, encode = self._node, self._epoch, self._encode
        parts = [encode(record, node, epoch) for record in records]
        return self._batch([record.revision for record in records], parts, 0, held=False)

    def _next_batch(self) -> _Batch:
        """Take pending records until their JSON reaches the batch size (with
        a change log, only consecutive readable ones)."""
        queue = self._queue
        node, epoch, encode = self._node, self._epoch, self._encode
        parts: list[bytes] = []
        revisions: list[int] = []
        size = 2
        nbytes = 0
        limit = self._change_log.readable_revision if self._change_log is not None else None
        while queue.pending and size < self._batch_bytes:
            if limit is not None and (
                queue.next_revision > limit or (revisions and queue.next_revision != revisions[-1] + 1)
            ):
                break
            record = queue.take()
            data = encode(record, node, epoch)
            parts.append(data)
            revisions.append(record.revision)
            size += len(data) + 1
            nbytes += record_bytes(record)
        return self._batch(revisions, parts, nbytes, held=True)

    def _batch(self, revisions: list[int], parts: list[bytes], nbytes: int, held: bool) -> _Batch:
        """The batch of the events of these revisions (encoded in `parts`) as
        its messages; publish after it next."""
        first, last = revisions[0], revisions[-1]
        self._next = last + 1
        links = self._tracing.write_links.take(first, last) if self._tracing is not None else []
        where = f"{self._node}/{self._epoch}"
        if self._per_event:
            messages = [(f"{where}/{rev}-{rev}", part) for rev, part in zip(revisions, parts, strict=True)]
        else:
            messages = [(f"{where}/{first}-{last}", cdc_events.join_events(parts))]
        return _Batch(first, last, len(parts), nbytes, messages, links, held)

    def _send(self, channel: aiormq.Channel, batch: _Batch, again: bool) -> None:
        if again:
            self.republished += batch.events
        else:
            self._in_flight.append(batch)
            self.published += batch.events
        if batch.links and self._tracing is not None:
            batch.span = self._tracing.publish_span(
                f"publish {self._exchange_name}",
                batch.links,
                {
                    "messaging.system": "rabbitmq",
                    "messaging.operation.type": "send",
                    "messaging.destination.name": self._exchange_name,
                    "messaging.rabbitmq.destination.routing_key": self._node,
                    "messaging.message.id": batch.messages[0][0],
                    "messaging.batch.message_count": len(batch.messages),
                    "fluxkv.cdc.events": batch.events,
                    "fluxkv.cdc.first_revision": batch.first,
                    "fluxkv.cdc.last_revision": batch.last,
                    "fluxkv.cdc.republished": again,
                },
            )
        # Publish every message, then await their confirms together. Tasks
        # take the channel's (FIFO) lock in creation order, so the broker
        # receives the messages in revision order.
        confirms = [
            asyncio.ensure_future(
                channel.basic_publish(
                    body,
                    exchange=self._exchange_name,
                    routing_key=self._node,
                    properties=aiormq.spec.Basic.Properties(
                        content_type=cdc_events.CONTENT_TYPE,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        message_id=message_id,
                        message_type=self._message_type,
                        app_id="fluxkv",
                    ),
                    wait=False,
                )
            )
            for message_id, body in batch.messages
        ]
        batch.publish = confirms[0] if len(confirms) == 1 else asyncio.gather(*confirms)
        batch.publish.add_done_callback(lambda done: self._on_publish_done(batch, done))

    def _on_publish_done(self, batch: _Batch, done: asyncio.Future[Any]) -> None:
        span, batch.span = batch.span, None
        if done.cancelled():
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, "the connection was lost; published again on the next one"))
                span.end()
            return
        exc = done.exception()
        if span is not None:
            if exc is not None:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            span.end()
        if exc is not None:
            self._fail(exc)  # a nack (DeliveryError) or a lost channel
            return
        batch.confirmed = True
        self._release_confirmed()
        if self._window_full or self._flushing:
            self._wake()

    def _on_connection_closed(self, connection: object, exc: BaseException | None = None) -> None:
        if connection is self._connection:
            self._fail(exc if exc is not None else ConnectionError("the connection was closed"))

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._wake()

    def _release_confirmed(self) -> None:
        """Release confirmed batches from the queue, oldest first, up to the
        first unconfirmed one (so confirmed_revision has no holes below it)."""
        in_flight = self._in_flight
        released = False
        while in_flight and in_flight[0].confirmed:
            batch = in_flight.popleft()
            if batch.held:
                self._queue.release(batch.events, batch.nbytes)
            self.confirmed += batch.events
            self.confirmed_revision = batch.last
            released = True
        if released:
            self._confirmed_more.set()
        drained = self._drained
        if drained is not None and not drained.done() and self._is_drained():
            drained.set_result(None)

    def _is_drained(self) -> bool:
        """Whether everything flush() waits for is confirmed."""
        if self._queue.depth:
            return False
        return self._change_log is None or self.confirmed_revision >= self._flush_target

    def _abandon_unconfirmed(self) -> None:
        """The connection is gone: forget its publishes. Unconfirmed batches
        stay in flight and are published again on the next connection."""
        self._release_confirmed()
        for batch in self._in_flight:
            if batch.publish is not None and not batch.publish.done():
                batch.publish.cancel()
            batch.publish = None

    # -- the checkpoint --------------------------------------------------------

    async def _keep_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Checkpoint the confirmed revision at most once every
        CHECKPOINT_INTERVAL_S (a failed write is tried again then)."""
        while True:
            while checkpoint.revision >= self.confirmed_revision:
                self._confirmed_more.clear()
                await self._confirmed_more.wait()
            await self._save_checkpoint(checkpoint)
            await asyncio.sleep(CHECKPOINT_INTERVAL_S)

    async def _save_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Write the confirmed revision to the checkpoint (in a thread), then
        raise the floor held in the change log to what the file holds."""
        await asyncio.to_thread(checkpoint.save, self.confirmed_revision)
        if self._hold is not None:
            self._hold.revision = checkpoint.revision

    def _wake(self) -> None:
        if self._wakeup is not None:
            _resolve(self._wakeup)

    def _report_drops(self) -> None:
        dropped = self._queue.dropped
        if dropped == self._dropped_reported:
            return
        now = time.monotonic()
        if now - self._drops_reported_at < _DROP_REPORT_INTERVAL_S:
            return
        log.warning(
            "CDC queue full: %d events dropped (FLUX_CDC_FULL_POLICY=drop), %d in all",
            dropped - self._dropped_reported,
            dropped,
            extra={"event": "cdc_dropped"},
        )
        self._dropped_reported = dropped
        self._drops_reported_at = now


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
