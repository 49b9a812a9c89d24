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

from fluxkv import __version__, config
from fluxkv.expiry import ActiveExpiry
from fluxkv.grpc_transport import GrpcTransport
from fluxkv.handlers import CompatHandlers, KVHandlers
from fluxkv.store import Store

log = logging.getLogger("fluxkv.server")


class Node:
    """One FluxKV node. start() binds and serves; stop() shuts down in order."""

    def __init__(self, settings: config.Settings) -> None:
        self.settings = settings
        self.version = __version__
        self.store = Store()
        self.node_id = settings.node_id
        self.address = ""
        self._expiry = ActiveExpiry(self.store, settings.expire_interval_ms, settings.expire_batch)
        self._expiry_task: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        kv = KVHandlers(self.store, settings, self)
        compat = CompatHandlers(self.store, settings)
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
        self._started = time.monotonic()
        log.info(
            "fluxkv %s node %s serving on %s (standalone: no etcd registration, no CDC publishing, no persistence)",
            self.version,
            self.node_id,
            self.address,
        )

    async def stop(self) -> None:
        """Stop accepting calls, let in-flight ones finish, stop background tasks."""
        grace = self.settings.shutdown_grace_s
        log.info("shutdown: refusing new calls, in-flight calls have %.1f s to finish", grace)
        await self._transport.stop(grace)
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            await asyncio.gather(self._expiry_task, return_exceptions=True)
        log.info("shutdown complete at revision %d with %d keys", self.store.revision, len(self.store))

    async def wait_failed(self) -> None:
        """Wait until a background task ends on its own (it must not), then raise."""
        assert self._expiry_task is not None
        await asyncio.wait([self._expiry_task])
        self._expiry_task.result()
        raise RuntimeError("the active expiry task stopped")

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
        return [("active_expiry", "running", self._expiry.describe())]


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
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for name in config.unknown_variables(os.environ):
        log.warning("ignoring %s: no such setting", name)
    sys.exit(asyncio.run(serve(settings)))
