"""fluxkv-gateway: the HTTP/JSON gateway in front of a FluxKV cluster (app.py),
with the nodes from FLUX_GATEWAY_NODES or etcd, until SIGTERM or SIGINT.

Shutdown: stop taking connections, end the open watches (their clients
reconnect elsewhere with Last-Event-ID), let requests in flight finish within
FLUX_SHUTDOWN_GRACE_S, then close the channels to the nodes and etcd.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager

import uvloop

from fluxkv import config
from fluxkv.client import Client, NodeSource, StaticNodes
from fluxkv.cluster.discovery import EtcdNodes
from fluxkv.cluster.etcd_client import EtcdError
from fluxkv.gateway.app import Gateway
from fluxkv.obs import logs
from fluxkv.obs.http_server import HttpServer
from fluxkv.obs.tracing import Tracing, from_settings
from fluxkv.security import tls
from fluxkv.version import __version__

log = logging.getLogger("fluxkv.gateway")


async def serve(settings: config.Settings) -> int:
    """Run the gateway until SIGTERM or SIGINT; return the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tracing = from_settings(settings, os.environ)
    if tracing is not None:
        tracing.start(f"gateway-{os.getpid()}", service="fluxkv-gateway")
    async with AsyncExitStack() as stack:
        source: NodeSource
        if settings.gateway_nodes:
            source = StaticNodes(settings.gateway_nodes)
            where = f"FLUX_GATEWAY_NODES ({', '.join(settings.gateway_nodes)})"
        else:
            etcd = EtcdNodes(
                settings.etcd_endpoints,
                settings.etcd_prefix,
                settings.etcd_timeout_s,
                tls=tls.etcd_tls(settings),
                username=settings.etcd_username,
                password=settings.etcd_password,
            )
            try:
                source = await stack.enter_async_context(etcd)
            except EtcdError as exc:
                log.error("cannot read the nodes from etcd (%s): %s", ",".join(settings.etcd_endpoints), exc)
                return 1
            where = f"etcd ({', '.join(settings.etcd_endpoints)}, under {settings.etcd_prefix})"
        try:
            gateway, server = await stack.enter_async_context(running(settings, source, tracing))
        except OSError as exc:
            log.error("%s", exc, extra={"event": "start_failed"})
            return 1
        log.info(
            "fluxkv-gateway %s serving on %s, routing to the nodes of %s (%d now)",
            __version__,
            server.url,
            where,
            len(gateway.client.nodes),
            extra={"event": "serving", "url": server.url, "port": server.port},
        )
        await stop.wait()
        log.info("shutting down", extra={"event": "shutdown"})
    if tracing is not None:
        await tracing.shutdown()
    log.info("stopped", extra={"event": "shutdown_complete"})
    return 0


@asynccontextmanager
async def running(
    settings: config.Settings, source: NodeSource, tracing: Tracing | None = None
) -> AsyncIterator[tuple[Gateway, HttpServer]]:
    """A gateway serving on its port, over the nodes of `source`, until the block ends; then it stops:
    no new connection, the watches ended, the requests in flight finished within FLUX_SHUTDOWN_GRACE_S."""
    async with Client(
        source,
        timeout=settings.gateway_timeout_s,
        vnodes=settings.ring_vnodes,
        max_batch_items=settings.max_batch_items,
        max_batch_bytes=settings.max_batch_bytes,
        tracer_provider=tracing.provider if tracing is not None else None,
        tls=tls.peer_tls(settings),
    ) as client:
        gateway = Gateway(client, settings, tracing)
        server = HttpServer(
            gateway.app,
            settings.host,
            settings.gateway_port,
            tls=tls.gateway_ssl_context(settings),
            what="gateway",
            grace_s=settings.shutdown_grace_s,
        )
        await server.start()
        try:
            yield gateway, server
        finally:
            gateway.close_watches()
            await server.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fluxkv-gateway",
        description="Serve Flux-KV's HTTP API (and FluxKV's) over a FluxKV cluster: FLUX_GATEWAY_* settings, and "
        "the nodes' FLUX_TLS_*, FLUX_ETCD_*, FLUX_RING_VNODES and batch limits. Flags override FLUX_* environment "
        "variables, which override defaults.",
    )
    parser.add_argument("--version", action="version", version=f"fluxkv {__version__}")
    config.add_arguments(parser)
    settings = config.parse_args(argv, os.environ, parser)
    if not settings.gateway_nodes and not settings.etcd_endpoints:
        parser.exit(2, f"{parser.prog}: error: name the nodes: FLUX_GATEWAY_NODES, or FLUX_ETCD_ENDPOINTS\n")
    logs.configure(settings.log_level, settings.log_format)
    for name in config.unknown_variables(os.environ):
        log.warning("ignoring %s: no such setting", name)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        sys.exit(runner.run(serve(settings)))
