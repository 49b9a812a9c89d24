"""The FluxKV node: owns the store, the transport and the background tasks,
and starts and stops them in order. `fluxkv-server` runs one."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Sequence

from fluxkv import __version__, config, logs
from fluxkv.cdc_publisher import CdcCounters, CdcPublisher
from fluxkv.cdc_queue import CdcQueue
from fluxkv.expiry import ActiveExpiry
from fluxkv.grpc_transport import GrpcTransport
from fluxkv.handlers import CompatHandlers, KVHandlers
from fluxkv.store import Store
from fluxkv.watch import WatchHub

log = logging.getLogger("fluxkv.server")


class Node:
    """One FluxKV node. start() binds and serves; stop() shuts down in order."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.version = __version__
        self.store = Store()
        # Attached before any write, so that its history starts at revision 1.
        self.watch_hub = WatchHub(settings.watch_history, settings.watch_history_bytes)
        self.store.attach_sink(self.watch_hub)
        self.node_id = settings.node_id
        self.address = ""
        self._expiry = ActiveExpiry(self.store, settings.expire_interval_ms, settings.expire_batch)
        self._expiry_task: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        self.cdc: CdcPublisher | None = None
        self._cdc_task: asyncio.Task[None] | None = None
        gate = None
        if settings.rabbitmq_url:
            queue = CdcQueue(
                settings.cdc_queue_events,
                settings.cdc_queue_bytes,
                settings.cdc_full_policy,
                settings.cdc_block_timeout_ms,
            )
            self.store.attach_sink(queue)
            self.cdc = CdcPublisher(queue, settings)
            if settings.cdc_full_policy == "block":
                gate = queue
        kv = KVHandlers(self.store, settings, self, gate, watch_hub=self.watch_hub)
        compat = CompatHandlers(self.store, settings, gate)
        self._transport = GrpcTransport(
            {
                "fluxkv.v1.KV": {
                    "Get": kv.get,
                    "Set": kv.set,
                    "Delete": kv.delete,
                    "MultiGet": kv.multi_get,
                    "MultiSet": kv.multi_set,
                    "Scan": kv.scan,
                    "Info": kv.info,
                    "Watch": kv.watch,
                },
                "service.KVService": {"Set": compat.set, "Get": compat.get, "Del": compat.delete},
            },
            settings.max_message_bytes,
        )

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    async def start(self) -> None:
        """Bind (OSError if the address is taken), serve, start background tasks."""
        s = self.settings
        port = self._transport.bind(s.host, s.port)
        self.address = f"{s.host}:{port}"
        self.node_id = s.node_id or f"{socket.gethostname()}:{port}"
        await self._transport.start()
        self._expiry_task = asyncio.create_task(self._expiry.run(), name="fluxkv-active-expiry")
        cdc = "no CDC publishing"
        if self.cdc is not None:
            self._cdc_task = asyncio.create_task(self.cdc.run(self.node_id, self.store.epoch), name="fluxkv-cdc")
            cdc = f"CDC to {config.redact_url(s.rabbitmq_url)} (policy {s.cdc_full_policy} when full)"
        self._started = time.monotonic()
        log.info(
            "fluxkv %s node %s serving on %s (no etcd registration, %s, no persistence)",
            self.version,
            self.node_id,
            self.address,
            cdc,
        )

    async def stop(self) -> None:
        """Stop accepting calls, let in-flight ones finish, stop background tasks."""
        grace = self.settings.shutdown_grace_s
        log.info(
            "shutdown: ending %d watches, refusing new calls, in-flight calls have %.1f s to finish",
            self.watch_hub.watchers,
            grace,
        )
        # Watches never finish on their own: end them now, not after the grace period.
        self.watch_hub.close()
        await self._transport.stop(grace)
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            await asyncio.gather(self._expiry_task, return_exceptions=True)
        if self.cdc is not None and self._cdc_task is not None:
            await self._flush_cdc(self.cdc, self._cdc_task)
        log.info("shutdown complete at revision %d with %d keys", self.store.revision, len(self.store))

    async def _flush_cdc(self, cdc: CdcPublisher, task: asyncio.Task[None]) -> None:
        """Publish and confirm every queued event, within FLUX_CDC_FLUSH_TIMEOUT_S."""
        timeout = self.settings.cdc_flush_timeout_s
        held = cdc.counters().queue_depth
        if held:
            log.info("shutdown: publishing %d CDC events, %.1f s at most", held, timeout)
        flushed = await cdc.flush(timeout)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        c = cdc.counters()
        if flushed:
            log.info("shutdown: the broker confirmed every CDC event, up to revision %d", c.confirmed_revision)
        else:
            log.error(
                "shutdown: %d CDC events above revision %d were not confirmed within %.1f s "
                "(FLUX_CDC_FLUSH_TIMEOUT_S) and are lost",
                c.queue_depth,
                c.confirmed_revision,
                timeout,
            )

    async def wait_failed(self) -> None:
        """Wait until a background task ends on its own (it must not), then raise."""
        assert self._expiry_task is not None
        tasks = [t for t in (self._expiry_task, self._cdc_task) if t is not None]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
        raise RuntimeError(f"background task {next(iter(done)).get_name()} stopped")

    # -- NodeStatus, for Info ---------------------------------------------

    def uptime_seconds(self) -> float:
        return time.monotonic() - self._started

    def rss_bytes(self) -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the peak, in KiB on Linux-like systems
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def subsystems(self) -> list[tuple[str, str, str]]:
        cdc = ("cdc", "disabled", "FLUX_RABBITMQ_URL is empty: changes are not published")
        if self.cdc is not None:
            cdc = ("cdc", self.cdc.connection, self.cdc.describe())
        return [
            ("active_expiry", "running", self._expiry.describe()),
            cdc,
            ("watch", "running", self.watch_hub.describe()),
        ]

    def cdc_counters(self) -> CdcCounters | None:
        return self.cdc.counters() if self.cdc is not None else None


async def serve(settings: config.Settings) -> int:
    """Run a node until SIGTERM or SIGINT; return the exit status."""
    node = Node(settings)
    # Handle signals before the node says it serves: a supervisor may send one
    # as soon as it reads that line.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, sig, stop)
    try:
        await node.start()
    except OSError as exc:
        log.error("%s", exc)
        return 1
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(node.wait_failed())
    await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if failed.done():
        log.error("background task failed: %r", failed.exception())
        status = 1
    failed.cancel()
    stopped.cancel()
    await node.stop()
    return status


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    log.info("received %s", sig.name)
    stop.set()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fluxkv-server",
        description="Run a FluxKV node. Flags override FLUX_* environment variables, which override defaults.",
    )
    parser.add_argument("--version", action="version", version=f"fluxkv {__version__}")
    config.add_arguments(parser)
    settings = config.parse_args(argv, os.environ, parser)
    logs.configure(settings.log_level)
    for name in config.unknown_variables(os.environ):
        log.warning("ignoring %s: no such setting", name)
    sys.exit(asyncio.run(serve(settings)))
