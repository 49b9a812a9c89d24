"""Consume FluxKV's change events from RabbitMQ: `CdcConsumer` for services
that react to changes, and the `fluxkv-cdc` program that writes them as JSON
lines to stdout or to a file.

A message may be in either of the nodes' formats (FLUX_CDC_FORMAT), told apart
by its body (cdc_events.decode_batch): a Flux-KV event is read as the
version-1 event it says, so it is handed out, deduplicated and written like
any other.

Delivery is at least once on both sides of the broker; the consumer drops the
events it has already seen (cdc_dedup) and acks a message only once its events
have been handled, so a handler sees every event exactly once as long as the
dedup state outlives the redelivery (in memory for one consumer; rebuilt from
the output file across fluxkv-cdc restarts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import ssl
import sys
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage
from aiormq.exceptions import (
    AuthenticationError,
    ChannelAccessRefused,
    ChannelInvalidStateError,
    ChannelLockedResource,
    ChannelPreconditionFailed,
    ConnectionNotAllowed,
    ProbableAuthenticationError,
    ProtocolSyntaxError,
)

from fluxkv import config
from fluxkv.cdc import amqp
from fluxkv.cdc.dedup import Deduplicator
from fluxkv.cdc.events import Event, SchemaError, decode_batch, join_events
from fluxkv.core.backoff import Backoff, stop_if_cancelling
from fluxkv.obs import logs
from fluxkv.security.tls import TLS
from fluxkv.version import __version__

__all__ = ["CdcConsumer", "CdcError", "PoisonMessageError", "main"]

log = logging.getLogger("fluxkv.cdc_consumer")

DEFAULT_PREFETCH = 100
# The FLUX_* variables fluxkv-cdc reads, by the flag they stand for (a flag overrides its variable).
VARIABLES: Mapping[str, str] = {
    "--url": "FLUX_RABBITMQ_URL",
    "--tls-ca": "FLUX_RABBITMQ_CA_FILE",
    "--tls-cert": "FLUX_RABBITMQ_CERT_FILE",
    "--tls-key": "FLUX_RABBITMQ_KEY_FILE",
    "--exchange": "FLUX_CDC_EXCHANGE",
    "--exchange-type": "FLUX_CDC_EXCHANGE_TYPE",
    "--queue": "FLUX_CDC_QUEUE",
    "--prefetch": "FLUX_CDC_PREFETCH",
    "--log-format": "FLUX_LOG_FORMAT",
}
CONNECT_TIMEOUT_S = 10.0
RETRY_MIN_S = 0.5
RETRY_MAX_S = 5.0
# The consumer's own binding, per exchange type: one that matches every node.
# A direct exchange has none; the nodes bind the queue with their ids.
_DEFAULT_BINDINGS: Mapping[str, tuple[str, ...]] = {"fanout": ("",), "headers": ("",), "topic": ("#",), "direct": ()}


class CdcError(Exception):
    """A fatal error: retrying cannot help (refused login or access, a queue or
    exchange declared otherwise, a poison message). The message says what."""


class PoisonMessageError(CdcError):
    """A message whose body is neither a batch of version-1 events nor a
    Flux-KV event with FluxKV's rev, node, epoch and ts_ms. It is left unacked,
    so it stays at the head of the queue until someone removes it."""


class _Session:
    """One connection; its deliveries can be acked only while it is alive."""

    __slots__ = ("alive",)

    def __init__(self) -> None:
        self.alive = True


@dataclass(slots=True)
class _Delivery:
    session: _Session
    message: AbstractIncomingMessage
    events: list[Event] = field(default_factory=list)


class CdcConsumer:
    """Change events from a RabbitMQ queue, deduplicated, with manual acks.

        async with CdcConsumer(url, queue="orders-cache") as consumer:
            async for event in consumer:
                await apply(event)

    Entering declares the exchange and the queue (both durable), binds them,
    starts consuming and returns; every event published from then on is
    delivered. Leaving closes the connection: messages not acked go back to the
    queue. A lost connection is retried for ever, the delay doubling from
    RETRY_MIN_S to RETRY_MAX_S with jitter (fluxkv/core/backoff.py); what was not acked is delivered again and
    deduplicated. Fatal errors raise CdcError (from entering or iterating).

    Iterate over events, or over groups of them with `batches()`. Either way a
    message is acked once all its events have been handled: when the loop asks
    for more after them. `stop()` ends the loop there, after the ack. Events of
    one node come in revision order, except that after a broker refused a
    publish a later batch can arrive before the earlier one published again.
    One task iterates at a time.
    """

    def __init__(
        self,
        url: str,
        *,
        queue: str = config.Settings.cdc_queue,
        exchange: str = config.Settings.cdc_exchange,
        exchange_type: str = config.Settings.cdc_exchange_type,
        binding_keys: Sequence[str] | None = None,
        prefetch: int = DEFAULT_PREFETCH,
        dedup: Deduplicator | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`binding_keys`: routing keys to bind the queue with; by default "#"
        for a topic exchange, none for direct (the nodes bind the queue with
        their ids) and "" otherwise. `prefetch`: most messages unacked at once.
        `dedup`: the state to start from. An event counts as seen once handed
        out, so pass one only if it holds what was durably handled (as
        fluxkv-cdc rebuilds it from its output file). `ssl_context`: how to
        verify an amqps:// broker (and the client certificate to present);
        by default the system's CAs, with no client certificate."""
        if ssl_context is not None and not url.startswith("amqps://"):
            raise ValueError(f"an ssl_context is for an amqps:// URL, got {config.redact_url(url)!r}")
        if exchange_type not in _DEFAULT_BINDINGS:
            raise ValueError(f"exchange_type must be one of {', '.join(_DEFAULT_BINDINGS)}, got {exchange_type!r}")
        if not 1 <= prefetch <= 65535:
            raise ValueError(f"prefetch must be from 1 to 65535, got {prefetch}")
        self._url = url
        self._where = config.redact_url(url)
        self._ssl_context = ssl_context if ssl_context is not None else amqp.ssl_context(url, TLS())
        self._queue = queue
        self._exchange = exchange
        self._exchange_type = exchange_type
        self._binding_keys = tuple(_DEFAULT_BINDINGS[exchange_type] if binding_keys is None else binding_keys)
        self._prefetch = prefetch
        self._dedup = dedup if dedup is not None else Deduplicator()
        self._inbox: deque[_Delivery] = deque()
        self._changed = asyncio.Event()
        self._consuming = False
        self._stopping = False
        self._failure: CdcError | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._connect_forever(), name="fluxkv-cdc-consumer")
        try:
            await self._wait(lambda: self._consuming or self._stopping or self._failure is not None)
            if self._failure is not None:
                raise self._failure
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; the broker keeps the messages not acked."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])

    def stop(self) -> None:
        """End the iteration once the events handed out are handled and acked
        (safe to call from a signal handler)."""
        self._stopping = True
        self._changed.set()

    async def __aiter__(self) -> AsyncIterator[Event]:
        async for events in self.batches():
            for event in events:
                yield event

    async def batches(self) -> AsyncIterator[list[Event]]:
        """The new events of the messages at hand (at most `prefetch`), waiting
        for one; a group is acked when the next is asked for."""
        if self._task is None:
            raise RuntimeError("enter the CdcConsumer (async with) before iterating")
        while deliveries := await self._take():
            events = [e for d in deliveries for e in d.events if self._dedup.is_new(e.node, e.epoch, e.rev)]
            if events:
                yield events
            await self._ack(deliveries)

    # -- the reader's side ---------------------------------------------------

    async def _take(self) -> list[_Delivery]:
        """The decoded deliveries at hand, in order, up to a poison message
        (raised when it comes first); empty once stopped."""
        await self._wait(lambda: bool(self._inbox) or self._stopping or self._failure is not None)
        if self._stopping:
            return []
        if self._failure is not None:
            raise self._failure
        taken: list[_Delivery] = []
        inbox = self._inbox
        while inbox:
            delivery = inbox[0]
            if not delivery.session.alive:  # the broker delivers it again
                inbox.popleft()
                continue
            try:
                delivery.events = decode_batch(delivery.message.body)
            except SchemaError as exc:
                if taken:
                    break
                raise self._poison(delivery.message, exc) from None
            taken.append(inbox.popleft())
        return taken

    async def _ack(self, deliveries: list[_Delivery]) -> None:
        """Ack each session's last delivery with multiple=True: the deliveries
        taken are all that session has not acked yet, in delivery order."""
        last = {id(d.session): d for d in deliveries}
        for delivery in last.values():
            if delivery.session.alive:
                # A lost connection fails the ack: the broker delivers those
                # messages again and the dedup state drops their events.
                with contextlib.suppress(ChannelInvalidStateError, aio_pika.exceptions.AMQPError, ConnectionError):
                    await delivery.message.ack(multiple=True)

    def _poison(self, message: AbstractIncomingMessage, exc: SchemaError) -> PoisonMessageError:
        body = message.body
        preview = repr(body[:60]) + ("..." if len(body) > 60 else "")
        return PoisonMessageError(
            f"queue {self._queue!r} holds a message that is neither a batch of version-1 CDC events nor a "
            "Flux-KV event with FluxKV's rev, node, epoch and ts_ms "
            f"(routing key {message.routing_key!r}, {len(body)} bytes, {preview}): {exc}; "
            "it is left in the queue: remove it to go on"
        )

    async def _wait(self, ready: Callable[[], bool]) -> None:
        while not ready():
            self._changed.clear()
            await self._changed.wait()

    # -- the connection's side -------------------------------------------------

    async def _connect_forever(self) -> None:
        """Consume, reconnecting with backoff; log a failure to connect only
        when its reason changes, so that an outage takes a line or two."""
        backoff = Backoff(RETRY_MIN_S, RETRY_MAX_S)
        last_reason = ""
        while True:
            session = _Session()
            try:
                await self._consume(session)
            except CdcError as exc:
                self._failure = exc
                self._changed.set()
                return
            except Exception as exc:
                stop_if_cancelling()
                reason = amqp.failure(exc)
                if self._consuming:
                    backoff.reset()
                    last_reason = ""
                    log.warning(
                        "lost the connection to %s (%s); reconnecting",
                        self._where,
                        reason,
                        extra={"event": "cdc_lost"},
                    )
                elif reason != last_reason:
                    last_reason = reason
                    log.warning(
                        "cannot connect to %s (%s); retrying every %g s at most",
                        self._where,
                        reason,
                        RETRY_MAX_S,
                        extra={"event": "cdc_unreachable"},
                    )
            finally:
                session.alive = False
                self._consuming = False
            await asyncio.sleep(backoff.next_delay())

    async def _consume(self, session: _Session) -> None:
        """Connect, declare, bind and consume until the connection is lost;
        raises why (CdcError when retrying cannot help)."""
        try:
            connection = await amqp.connect(self._url, self._ssl_context, CONNECT_TIMEOUT_S)
        except (AuthenticationError, ProbableAuthenticationError) as exc:
            raise CdcError(f"the broker at {self._where} refused the login: {exc}") from None
        except ProtocolSyntaxError:  # as when RabbitMQ answers Connection.Open with Connection.Close
            raise CdcError(
                f"the broker at {self._where} closed the connection instead of opening it: does the virtual host "
                "in the URL exist, and may this user use it?"
            ) from None
        lost = asyncio.Event()
        reasons: list[Exception] = []

        def on_close(_: object, exc: BaseException | None = None) -> None:
            session.alive = False
            reasons.append(exc if isinstance(exc, Exception) else ConnectionError("the connection was closed"))
            lost.set()

        async def on_message(message: AbstractIncomingMessage) -> None:
            self._inbox.append(_Delivery(session, message))
            self._changed.set()

        try:
            try:
                connection.close_callbacks.add(on_close)
                channel = await connection.channel()
                channel.close_callbacks.add(on_close)
                await channel.set_qos(prefetch_count=self._prefetch)
                exchange = await channel.declare_exchange(self._exchange, self._exchange_type, durable=True)
                queue = await channel.declare_queue(self._queue, durable=True)
                for key in self._binding_keys:
                    await queue.bind(exchange, routing_key=key)
                await queue.consume(on_message)
            except (ChannelAccessRefused, ConnectionNotAllowed) as exc:
                raise CdcError(f"the broker at {self._where} refused access: {exc}") from None
            except (ChannelPreconditionFailed, ChannelLockedResource) as exc:
                raise CdcError(f"the broker at {self._where} refused the exchange or queue: {exc}") from None
            log.info(
                "consuming queue %r of %s exchange %r at %s",
                self._queue,
                self._exchange_type,
                self._exchange,
                self._where,
                extra={"event": "cdc_connected"},
            )
            self._consuming = True
            self._changed.set()
            # Once consuming, any loss is retried (say, the broker's consumer
            # timeout closing the channel): the setup above says what is fatal.
            await lost.wait()
            raise reasons[0]
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), CONNECT_TIMEOUT_S)


# -- fluxkv-cdc -----------------------------------------------------------------


class _OutputFile:
    """--output: events appended as JSON lines and fsynced before their
    messages are acked. One writer at a time (an flock)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise CdcError(f"{path} is being written by another process") from None

    def recover(self, dedup: Deduplicator) -> tuple[int, int]:
        """Mark the events in the file as seen; cut off a torn last line (a
        write interrupted by a crash, never acked: it is delivered again).
        Returns the number of events and of bytes cut off."""
        events = offset = 0
        with open(self._fd, "rb", closefd=False) as lines:
            for number, line in enumerate(lines, 1):
                if not line.endswith(b"\n"):
                    os.ftruncate(self._fd, offset)
                    os.fsync(self._fd)
                    return events, len(line)
                try:
                    [event] = decode_batch(join_events([line]))
                except ValueError as exc:
                    raise CdcError(
                        f"{self.path} line {number} is not a CDC event ({exc}); not appending to it"
                    ) from None
                dedup.is_new(event.node, event.epoch, event.rev)
                events += 1
                offset += len(line)
        return events, 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def _write_stdout(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@dataclass(frozen=True)
class Options:
    """What fluxkv-cdc runs with (parse_args)."""

    url: str
    tls: TLS
    exchange: str
    exchange_type: str
    queue: str
    binding_keys: tuple[str, ...] | None
    prefetch: int
    output: str | None
    log_format: str


async def _run(options: Options) -> int:
    """Consume until SIGTERM or SIGINT; returns the exit status."""
    dedup = Deduplicator()
    consumer = CdcConsumer(
        options.url,
        queue=options.queue,
        exchange=options.exchange,
        exchange_type=options.exchange_type,
        binding_keys=options.binding_keys,
        prefetch=options.prefetch,
        dedup=dedup,
        ssl_context=amqp.ssl_context(options.url, options.tls),
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, sig, consumer)
    output: _OutputFile | None = None
    try:
        if options.output is not None:
            output = _OutputFile(options.output)
            known, torn = output.recover(dedup)
            log.info(
                "appending to %s: %d events already there%s",
                output.path,
                known,
                f"; cut off a torn last line of {torn} bytes" if torn else "",
            )
        write = output.write if output is not None else _write_stdout
        written = 0
        async with consumer:
            async for events in consumer.batches():
                data = b"".join(orjson.dumps(e.raw, option=orjson.OPT_APPEND_NEWLINE) for e in events)
                await asyncio.to_thread(write, data)
                written += len(events)
        log.info("stopped; %d events written", written, extra={"event": "stopped", "events": written})
        return 0
    except BrokenPipeError:  # stdout closed early, as by `| head`: end quietly, as if killed by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except CdcError as exc:
        log.error("%s", exc, extra={"event": "failed"})
        return 1
    except OSError as exc:
        log.error("%s: %s", exc.filename or options.output or "stdout", exc.strerror or exc, extra={"event": "failed"})
        return 1
    finally:
        if output is not None:
            output.close()


def _on_signal(sig: signal.Signals, consumer: CdcConsumer) -> None:
    log.info("received %s; stopping", sig.name, extra={"event": "signal", "signal": sig.name})
    consumer.stop()


def _parser() -> argparse.ArgumentParser:
    s = config.Settings
    parser = argparse.ArgumentParser(
        prog="fluxkv-cdc",
        description="Write FluxKV's change events from RabbitMQ as JSON lines, each event once: to stdout, or "
        "appended to --output FILE and fsynced before the broker is told. Flags override FLUX_* environment "
        "variables, which override defaults.",
    )
    parser.add_argument("--version", action="version", version=f"fluxkv {__version__}")
    parser.add_argument(
        "--url", help="AMQP URL of the broker, e.g. amqp://guest:guest@127.0.0.1:5672/ [FLUX_RABBITMQ_URL]"
    )
    parser.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="PEM CA certificates an amqps:// broker is verified with (default: the system's) [FLUX_RABBITMQ_CA_FILE]",
    )
    parser.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="PEM client certificate for an amqps:// broker that asks for one [FLUX_RABBITMQ_CERT_FILE]",
    )
    parser.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert [FLUX_RABBITMQ_KEY_FILE]")
    parser.add_argument(
        "--exchange", help=f"exchange the nodes publish to (default {s.cdc_exchange}) [FLUX_CDC_EXCHANGE]"
    )
    parser.add_argument(
        "--exchange-type",
        help=f"its type: {', '.join(_DEFAULT_BINDINGS)} (default {s.cdc_exchange_type}) [FLUX_CDC_EXCHANGE_TYPE]",
    )
    parser.add_argument("--queue", help=f"durable queue to consume (default {s.cdc_queue}) [FLUX_CDC_QUEUE]")
    parser.add_argument(
        "--binding-key",
        action="append",
        dest="binding_keys",
        metavar="KEY",
        help="bind the queue with this routing key (repeatable); by default # for topic, none for direct "
        '(the nodes bind the queue with their ids), "" for fanout and headers',
    )
    parser.add_argument(
        "--prefetch", help=f"most messages unacked at once (default {DEFAULT_PREFETCH}) [FLUX_CDC_PREFETCH]"
    )
    parser.add_argument("--output", metavar="FILE", help="append to FILE instead of writing to stdout")
    parser.add_argument("--log-format", help="log lines as console text (default) or json [FLUX_LOG_FORMAT]")
    return parser


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> Options:
    """fluxkv-cdc's options: flags, then FLUX_* variables (VARIABLES), then defaults; bad usage exits 2."""
    parser = _parser()
    args = parser.parse_args(argv)
    s = config.Settings

    def value(flag: str, default: str) -> tuple[str, str]:
        given = getattr(args, flag.removeprefix("--").replace("-", "_"))
        env = VARIABLES[flag]
        return (flag, given) if given is not None else (env, environ.get(env, default))

    source, url = value("--url", "")
    url = url.strip()
    if not url:
        parser.error("no broker: give --url or set FLUX_RABBITMQ_URL")
    if not url.startswith(("amqp://", "amqps://")):
        parser.error(f"invalid {source}: expected an amqp:// or amqps:// URL, got {config.redact_url(url)!r}")
    (ca_source, ca_file), (cert_source, cert_file), (key_source, key_file) = (
        (name, path.strip()) for name, path in (value(flag, "") for flag in ("--tls-ca", "--tls-cert", "--tls-key"))
    )
    try:
        config.check_rabbitmq_tls(url, ca_file, cert_file, key_file, names=(ca_source, cert_source, key_source))
    except config.ConfigError as exc:
        parser.error(str(exc))
    names: dict[str, str] = {}
    for flag, default in (("--exchange", s.cdc_exchange), ("--queue", s.cdc_queue)):
        source, text = value(flag, default)
        if not text.strip():
            parser.error(f"invalid {source}: expected a name, got an empty value")
        names[flag] = text.strip()
    source, text = value("--exchange-type", s.cdc_exchange_type)
    exchange_type = text.strip().lower()
    if exchange_type not in _DEFAULT_BINDINGS:
        parser.error(f"invalid {source}: expected one of {', '.join(_DEFAULT_BINDINGS)}, got {text!r}")
    source, text = value("--prefetch", str(DEFAULT_PREFETCH))
    try:
        prefetch = int(text)
    except ValueError:
        prefetch = 0
    if not 1 <= prefetch <= 65535:
        parser.error(f"invalid {source}: expected an integer from 1 to 65535, got {text!r}")
    source, text = value("--log-format", s.log_format)
    log_format = text.strip().lower()
    if log_format not in logs.FORMATS:
        parser.error(f"invalid {source}: expected one of {', '.join(logs.FORMATS)}, got {text!r}")
    return Options(
        url=url,
        tls=TLS(ca_file, cert_file, key_file),
        exchange=names["--exchange"],
        exchange_type=exchange_type,
        queue=names["--queue"],
        binding_keys=tuple(args.binding_keys) if args.binding_keys is not None else None,
        prefetch=prefetch,
        output=args.output,
        log_format=log_format,
    )


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv, os.environ)
    logs.configure(logging.INFO, options.log_format)
    sys.exit(asyncio.run(_run(options)))
