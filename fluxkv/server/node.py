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
from collections.abc import Mapping, Sequence
from http import HTTPStatus

import uvloop

from fluxkv import config
from fluxkv.aof.file import AofCounters, AofSettings, AppendOnlyFile
from fluxkv.aof.file_format import AofCorrupt
from fluxkv.cdc.publisher import CdcCounters, CdcPublisher
from fluxkv.cdc.queue import CdcQueue
from fluxkv.cluster.discovery import Discovery
from fluxkv.cluster.etcd_client import EtcdAuthFailed, EtcdClient, EtcdError
from fluxkv.cluster.forwarding import Router
from fluxkv.cluster.registration import Registration
from fluxkv.core.errors import ErrorKind, KVError
from fluxkv.core.expiry import ActiveExpiry
from fluxkv.core.store import Store
from fluxkv.core.watch import WatchHub
from fluxkv.obs import logs
from fluxkv.obs.admin import AdminServer, Page, Request, Response, text
from fluxkv.obs.metrics import CONTENT_TYPE, Family, Registry, RequestMetrics, counter, gauge
from fluxkv.obs.profiling import Profiler
from fluxkv.obs.tracing import Tracing, from_settings
from fluxkv.security import tls
from fluxkv.security.tokens import Role, TokensFileError
from fluxkv.server import workers
from fluxkv.server.auth import TOKENS_SETTING, NodeAuth, load_tokens
from fluxkv.server.grpc_transport import GrpcTransport, Handler, loop_factory
from fluxkv.server.handlers import CompatHandlers, KVHandlers, WritePath
from fluxkv.version import __version__

log = logging.getLogger("fluxkv.server")


class Node:
    """One FluxKV node. start() binds and serves; stop() shuts down in order.
    `tracing`: where its spans go (fluxkv/obs/tracing.py); None traces nothing."""

    def __init__(self, settings: config.Settings, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.tracing = tracing
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
        self._started_at = time.time()
        # Metrics: the transport counts requests; the rest is read at scrape time
        # from the parts below, each of which registers its collector.
        self.metrics = Registry()
        self.metrics.register(self._collect)
        requests = RequestMetrics()
        self.metrics.register(requests.collect)
        # The append-only file: replayed at start(), before the node serves.
        self.aof: AppendOnlyFile | None = None
        if settings.aof_filename:
            self.aof = AppendOnlyFile(
                AofSettings(
                    settings.aof_filename,
                    settings.aof_append_fsync,
                    settings.aof_rewrite_min_bytes,
                    settings.aof_rewrite_percent,
                    settings.aof_buffer_bytes,
                ),
                self.store,
            )
            self.store.attach_sink(self.aof)
            self.metrics.register(self.aof.collect)
        self.cdc: CdcPublisher | None = None
        self._cdc_task: asyncio.Task[None] | None = None
        gate = None
        if settings.rabbitmq_url:
            # With the AOF, a full queue spills to it instead of blocking or dropping.
            policy = "spill" if self.aof is not None else settings.cdc_full_policy
            queue = CdcQueue(settings.cdc_queue_events, settings.cdc_queue_bytes, policy, settings.cdc_block_timeout_ms)
            self.store.attach_sink(queue)
            self.cdc = CdcPublisher(queue, settings, self.aof, tracing)
            self.metrics.register(self.cdc.collect)
            if tracing is not None:  # the publish spans link to the sampled writes they carry
                self.store.attach_sink(tracing.write_links)
                self.metrics.register(tracing.collect)
            if policy == "block":
                gate = queue
        # Cluster membership, when etcd is configured: set up at start(),
        # once the port (and so the address to register) is known.
        self._etcd: EtcdClient | None = None
        self._registration: Registration | None = None
        self._discovery: Discovery | None = None
        self._cluster_tasks: list[asyncio.Task[None]] = []
        self.router: Router | None = None
        if settings.etcd_endpoints:
            self.router = Router("", settings.ring_vnodes, settings.max_message_bytes, tracing, tls.peer_tls(settings))
        # Tokens (FLUX_AUTH_TOKENS_FILE): TokensFileError here if the file is bad (main() checks it first).
        self.auth: NodeAuth | None = None
        if settings.auth_tokens_file:
            self.auth = NodeAuth(settings.auth_tokens_file)
            self.metrics.register(self.auth.collect)
        # Readiness: serving, and not yet stopping (and, with etcd, registered).
        self._serving = False
        self._stopping = False
        # The admin HTTP port (FLUX_ADMIN_PORT): health, readiness and CPU profiles (FLUX_PPROF_ENABLED).
        self.profiler = Profiler() if settings.pprof_enabled else None
        self.admin: AdminServer | None = None
        if settings.admin_port is not None:
            pages = {
                "/metrics": Page(self._metrics_page, "Prometheus metrics (text format 0.0.4)"),
                "/healthz": Page(self._healthz, "liveness: 200 while the process runs"),
                "/readyz": Page(self._readyz, "readiness: 200 while serving (and registered in etcd), else 503"),
            }
            if self.profiler is not None:
                pages |= self.profiler.pages()
            if self.auth is not None:  # /healthz and /readyz stay open for probes
                guard = self.auth.page
                pages["/metrics"] = guard(pages["/metrics"], None, "/metrics")
                if self.profiler is not None:
                    pages |= {path: guard(pages[path], Role.ADMIN, path) for path in self.profiler.pages()}
            self.admin = AdminServer(settings.host, settings.admin_port, pages, tls.server_ssl_context(settings))
        writes = WritePath(gate, self.aof)
        kv = KVHandlers(self.store, settings, self, writes, watch_hub=self.watch_hub, router=self.router)
        compat = CompatHandlers(self.store, settings, writes)
        services: Mapping[str, Mapping[str, Handler]] = {
            "fluxkv.v1.KV": {
                "Get": kv.get,
                "Set": kv.set,
                "Delete": kv.delete,
                "MultiGet": kv.multi_get,
                "MultiSet": kv.multi_set,
                "Scan": kv.scan,
                "Info": kv.info,
                "Watch": kv.watch,
                "RewriteAof": kv.rewrite_aof,
            },
            "service.KVService": {"Set": compat.set, "Get": compat.get, "Del": compat.delete},
        }
        if self.router is not None:
            services = self.router.forwarding(services)
        if self.auth is not None:  # outermost: a call is checked before it is forwarded
            services = self.auth.guard(services)
        self._transport = GrpcTransport(
            services,
            settings.max_message_bytes,
            requests,
            tracing,
            grpc_server_of(settings),
            tls.server_credentials(settings),
            authorize=None if self.auth is None else self.auth.check_metadata,
        )

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    async def start(self) -> None:
        """Replay the append-only file (AofCorrupt if it is corrupt), bind
        (OSError if the address is taken), serve, start background tasks.
        With etcd and FLUX_ETCD_AT_START=fail, EtcdError if etcd cannot be reached."""
        s = self.settings
        persistence = "no persistence"
        try:
            # The admin port first, so that /readyz says 503 while the node starts (and
            # before binding gRPC: grpcio releases a port only once its server has started).
            if self.admin is not None:
                await self.admin.start()
                if self.profiler is not None:
                    self.profiler.announce(self.admin.url)
            if self.aof is not None:
                persistence = await self._replay(self.aof)
            port = self._transport.bind(s.host, s.port)
            self.address = f"{s.host}:{port}"
            self.node_id = s.node_id or f"{socket.gethostname()}:{port}"
            if self.tracing is not None:
                self.tracing.start(self.node_id)
            if self.router is not None:
                await self._join_prepare(advertised_address(s, port))
            await self._transport.start()
            self._serving = True
            if self.router is not None:
                await self._join()
        except BaseException:
            await self._abandon_start()
            raise
        self._expiry_task = asyncio.create_task(self._expiry.run(), name="fluxkv-active-expiry")
        etcd = "no etcd registration"
        if self._registration is not None:
            assert self._etcd is not None
            etcd = f"etcd registration {self._registration.key} {self._registration.state} ({self._etcd.describe()})"
        cdc = "no CDC publishing"
        if self.cdc is not None:
            self._cdc_task = asyncio.create_task(self.cdc.run(self.node_id, self.store.epoch), name="fluxkv-cdc")
            cdc = f"CDC to {config.redact_url(s.rabbitmq_url)} (policy {self.cdc.counters().full_policy} when full)"
        self._started = time.monotonic()
        self._started_at = time.time()
        log.info(
            "fluxkv %s node %s serving on %s (gRPC on %s %s, %s, %s, %s)",
            self.version,
            self.node_id,
            self.address,
            self._transport.version,
            describe_tls(s),
            etcd,
            cdc,
            persistence,
            extra={"event": "serving", "node_id": self.node_id, "address": self.address, "version": self.version},
        )

    async def _abandon_start(self) -> None:
        """Undo a start that failed: stop serving, close what was opened."""
        self._serving = False
        if self.admin is not None:
            await self.admin.stop()
        await self._transport.stop(0)
        if self._etcd is not None:
            await self._etcd.close()
        if self.tracing is not None:
            await self.tracing.shutdown()
        if self.aof is not None:
            await self.aof.close()

    async def _replay(self, aof: AppendOnlyFile) -> str:
        """Load the store from the append-only file; let CDC resume from its
        checkpoint (holding the file there) before the writer, and with it
        rewrites, starts."""
        result = await asyncio.to_thread(aof.open)
        self.watch_hub.start_after(self.store.revision)
        if self.cdc is not None:
            await self.cdc.resume(self.store.epoch)
        aof.start()
        if result is None:
            log.info(
                "append-only file %s created (epoch %s)", aof.path, self.store.epoch, extra={"event": "aof_created"}
            )
        else:
            log.info(
                "append-only file %s replayed: %d records in %.2f s (%.0f a second), %d keys, revision %d, epoch %s",
                aof.path,
                result.records,
                result.seconds,
                result.records / result.seconds if result.seconds else 0,
                len(self.store),
                result.revision,
                result.epoch,
                extra={"event": "aof_replayed", "records": result.records, "revision": result.revision},
            )
        return f"append-only file {aof.path}, fsync {aof.fsync_policy}"

    async def _join_prepare(self, advertised: str) -> None:
        """Read the cluster's members before serving (with FLUX_ETCD_AT_START=fail,
        an unreachable etcd stops the start here)."""
        s = self.settings
        assert self.router is not None
        self.router.address = advertised
        self._etcd = EtcdClient(
            s.etcd_endpoints, s.etcd_timeout_s, tls=tls.etcd_tls(s), username=s.etcd_username, password=s.etcd_password
        )
        self._registration = Registration(self._etcd, s.etcd_prefix, advertised, s.etcd_lease_ttl_s)
        self._discovery = Discovery(self._etcd, s.etcd_prefix)
        self._discovery.on_change(self.router.update)
        self.metrics.register(self._registration.collect)
        self.metrics.register(self._collect_cluster)
        try:
            await self._discovery.read()
        except EtcdError as exc:
            if s.etcd_at_start == "fail":
                raise
            log.warning(
                "%s at start (%s): serving unregistered, retrying in the background",
                etcd_failure(exc),
                exc,
                extra={"event": "etcd_unreachable"},
            )

    async def _join(self) -> None:
        """Register now that the node serves, then keep registration and membership current."""
        assert self._registration is not None and self._discovery is not None
        try:
            await self._registration.register()
        except EtcdError as exc:
            if self.settings.etcd_at_start == "fail":
                raise
            log.warning(
                "cannot register in etcd yet (%s: %s); retrying in the background",
                etcd_failure(exc),
                exc,
                extra={"event": "etcd_unreachable"},
            )
        self._cluster_tasks = [
            asyncio.create_task(self._registration.run(), name="fluxkv-etcd-registration"),
            asyncio.create_task(self._discovery.run(), name="fluxkv-etcd-discovery"),
        ]

    async def stop(self) -> None:
        """Stop accepting calls, let in-flight ones finish, stop background tasks."""
        self._stopping = True  # /readyz answers 503 from here on
        await self._transport.not_serving()  # and gRPC health NOT_SERVING
        grace = self.settings.shutdown_grace_s
        log.info(
            "shutdown: not ready any more, ending %d watches, refusing new calls, in-flight calls have %.1f s "
            "to finish",
            self.watch_hub.watchers,
            grace,
            extra={"event": "shutdown_started"},
        )
        if self._registration is not None:
            # Leave the ring first, so that clients stop sending calls here.
            for task in self._cluster_tasks[:1]:
                task.cancel()
            try:
                await asyncio.wait_for(self._registration.revoke(), self.settings.etcd_timeout_s)
            except TimeoutError:
                log.warning(
                    "shutdown: etcd did not answer in time; the registration expires with its lease",
                    extra={"event": "deregister_failed"},
                )
        # Watches never finish on their own: end them now, not after the grace period.
        self.watch_hub.close()
        draining = time.monotonic()
        await self._transport.stop(grace)
        self._serving = False
        log.info(
            "shutdown: gRPC stopped after %.2f s of in-flight calls",
            time.monotonic() - draining,
            extra={"event": "shutdown_grpc_stopped"},
        )
        if self._expiry_task is not None:
            self._expiry_task.cancel()
            await asyncio.gather(self._expiry_task, return_exceptions=True)
        if self.aof is not None:  # all on disk first: CDC publishes only what the file holds
            try:
                await self.aof.sync()
            except KVError as exc:
                log.error("shutdown: %s", exc)
        if self.cdc is not None and self._cdc_task is not None:
            await self._flush_cdc(self.cdc, self._cdc_task)
        if self.aof is not None:  # after CDC, which reads from it until it stops
            await self.aof.close()
            log.info(
                "shutdown: append-only file %s closed at revision %d",
                self.aof.path,
                self.store.revision,
                extra={"event": "aof_closed"},
            )
        for task in self._cluster_tasks:
            task.cancel()
        await asyncio.gather(*self._cluster_tasks, return_exceptions=True)
        if self.router is not None:
            await self.router.close()
        if self._etcd is not None:
            await self._etcd.close()
        if self.tracing is not None:
            await self.tracing.shutdown()
        if self.admin is not None:  # last: /readyz says 503 until the end
            await self.admin.stop()
        log.info(
            "shutdown complete at revision %d with %d keys",
            self.store.revision,
            len(self.store),
            extra={"event": "shutdown_complete", "revision": self.store.revision},
        )

    async def _flush_cdc(self, cdc: CdcPublisher, task: asyncio.Task[None]) -> None:
        """Publish and confirm every queued event, within FLUX_CDC_FLUSH_TIMEOUT_S."""
        timeout = self.settings.cdc_flush_timeout_s
        held = cdc.counters().queue_depth
        if held:
            log.info(
                "shutdown: publishing %d CDC events, %.1f s at most",
                held,
                timeout,
                extra={"event": "shutdown_cdc_flush"},
            )
        flushed = await cdc.flush(timeout)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await cdc.close()
        c = cdc.counters()
        if flushed:
            log.info(
                "shutdown: the broker confirmed every CDC event, up to revision %d",
                c.confirmed_revision,
                extra={"event": "shutdown_cdc_flushed", "revision": c.confirmed_revision},
            )
        else:
            log.error(
                "shutdown: %d CDC events above revision %d were not confirmed within %.1f s "
                "(FLUX_CDC_FLUSH_TIMEOUT_S) and are lost",
                c.queue_depth,
                c.confirmed_revision,
                timeout,
                extra={"event": "shutdown_cdc_lost", "revision": c.confirmed_revision},
            )

    async def wait_failed(self) -> None:
        """Wait until a background task ends on its own (it must not), then raise."""
        assert self._expiry_task is not None
        tasks = [t for t in (self._expiry_task, self._cdc_task, *self._cluster_tasks) if t is not None]
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
        etcd = ("etcd", "disabled", "FLUX_ETCD_ENDPOINTS is empty: the node runs on its own")
        if self._registration is not None and self._discovery is not None and self.router is not None:
            assert self._etcd is not None
            detail = (
                f"{self._registration.describe()}; {len(self._discovery.addresses)} nodes in the ring; "
                f"{self.router.forwarded} calls forwarded to their key's owner; {self._etcd.describe()}"
            )
            if self._etcd.auth_error:
                refused = _etcd_refused(self._etcd.username)
                etcd = ("etcd", "auth_failed", f"{refused}: {self._etcd.auth_error}; retrying; {detail}")
            else:
                etcd = ("etcd", self._registration.state, detail)
        aof = ("aof", "disabled", "FLUX_AOF_FILENAME is empty: nothing is kept on disk")
        if self.aof is not None:
            aof = ("aof", self.aof.state, self.aof.describe())
        admin = ("admin", "disabled", "FLUX_ADMIN_PORT is off: no metrics, health, readiness or profiling endpoint")
        if self.admin is not None:
            profiling = "profiling off (FLUX_PPROF_ENABLED is false)"
            if self.profiler is not None:
                profiling = self.profiler.describe()
            admin = ("admin", "running", f"{self.admin.url}: /metrics, /healthz, /readyz; {profiling}")
        auth = ("auth", "disabled", "FLUX_AUTH_TOKENS_FILE is empty: calls need no token")
        if self.auth is not None:
            auth = ("auth", "enabled", self.auth.describe())
        grpc = (
            "grpc",
            self._transport.server,
            f"{self._transport.version} serves {self.address} {describe_tls(self.settings)} "
            f"(FLUX_GRPC_SERVER={self.settings.grpc_server}, "
            f"FLUX_EVENT_LOOP={self.settings.event_loop}) on "
            f"{'uvloop' if isinstance(asyncio.get_running_loop(), uvloop.Loop) else 'asyncio'}'s event loop",
        )
        return [
            ("active_expiry", "running", self._expiry.describe()),
            cdc,
            ("watch", "running", self.watch_hub.describe()),
            etcd,
            admin,
            aof,
            auth,
            grpc,
        ]

    def cdc_counters(self) -> CdcCounters | None:
        return self.cdc.counters() if self.cdc is not None else None

    def aof_counters(self) -> AofCounters | None:
        return self.aof.counters() if self.aof is not None else None

    def cdc_checkpoint_revision(self) -> int:
        return self.cdc.checkpoint_revision if self.cdc is not None else 0

    async def rewrite_aof(self) -> tuple[int, int, float]:
        """Rewrite the append-only file now: (size before, size after, seconds)."""
        if self.aof is None:
            raise KVError(
                ErrorKind.FAILED_PRECONDITION,
                "this node has no append-only file to rewrite (FLUX_AOF_FILENAME is empty)",
            )
        before = self.aof.counters().size_bytes
        started = time.monotonic()
        await asyncio.shield(self.aof.request_rewrite())
        return before, self.aof.counters().size_bytes, time.monotonic() - started

    # -- the admin port's pages ----------------------------------------------

    def readiness(self) -> tuple[bool, str]:
        """Whether clients should be sent here now, and why (not)."""
        if self._stopping:
            return False, "shutting down"
        if not self._serving:
            return False, "starting"
        if self._registration is not None and self._registration.state != "registered":
            return False, f"not registered in etcd ({self._registration.state}); retrying"
        return True, f"serving on {self.address}"

    async def _metrics_page(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)

    def _collect(self) -> list[Family]:
        """The node's own metrics: the store, watches, readiness, the process."""
        return [
            gauge(
                "fluxkv_node_info",
                "This node's id, version and epoch (which names its sequence of revisions); always 1.",
                1,
                node_id=self.node_id,
                version=self.version,
                epoch=self.store.epoch,
            ),
            gauge(
                "fluxkv_grpc_server_info",
                "The gRPC server that serves this node (FLUX_GRPC_SERVER) and its version; always 1.",
                1,
                server=self._transport.server,
                version=self._transport.version,
            ),
            gauge("fluxkv_ready", "1 while /readyz answers 200, else 0.", int(self.readiness()[0])),
            gauge("fluxkv_keys", "Keys held (expired keys not yet removed included).", len(self.store)),
            gauge("fluxkv_data_bytes", "Bytes of the keys (UTF-8) and values held.", self.store.data_bytes),
            gauge(
                "fluxkv_revision",
                "The node's latest revision: the number of changes since it started.",
                self.store.revision,
            ),
            counter("fluxkv_expired_keys_total", "Keys removed because their TTL passed.", self.store.expired_keys),
            gauge("fluxkv_watchers", "Open Watch streams.", self.watch_hub.watchers),
            counter(
                "fluxkv_watch_fell_behind_total",
                "Watch streams ended with OUT_OF_RANGE because they fell behind the history.",
                self.watch_hub.fell_behind,
            ),
            gauge("process_resident_memory_bytes", "Resident memory size in bytes.", self.rss_bytes()),
            gauge("fluxkv_start_time_seconds", "When the node started serving, in Unix seconds.", self._started_at),
        ]

    def _collect_cluster(self) -> list[Family]:
        assert self._discovery is not None and self.router is not None and self._etcd is not None
        return [
            counter(
                "fluxkv_etcd_authentications_total",
                "Tokens this node got from etcd's auth (FLUX_ETCD_USERNAME): the first, then one each time etcd "
                "refused the last as expired.",
                self._etcd.authentications,
            ),
            gauge(
                "fluxkv_ring_nodes",
                "Nodes in the consistent-hash ring, as registered in etcd.",
                len(self._discovery.addresses),
            ),
            counter("fluxkv_forwarded_calls_total", "Calls forwarded to their key's owner.", self.router.forwarded),
        ]

    async def _healthz(self, request: Request) -> Response:
        return text(HTTPStatus.OK, "ok")

    async def _readyz(self, request: Request) -> Response:
        ready, why = self.readiness()
        if ready:
            return text(HTTPStatus.OK, f"ready: {why}")
        return text(HTTPStatus.SERVICE_UNAVAILABLE, f"not ready: {why}")


async def serve(settings: config.Settings) -> int:
    """Run a node until SIGTERM or SIGINT; return the exit status."""
    node = Node(settings, from_settings(settings, os.environ))
    log.info("fluxkv %s starting (pid %d)", __version__, os.getpid(), extra={"event": "starting", "pid": os.getpid()})
    if settings.grpc_server != grpc_server_of(settings):
        log.warning(
            "FLUX_GRPC_SERVER=%s, but pygrpc-native has no TLS: serving TLS on grpcio",
            settings.grpc_server,
            extra={"event": "tls_on_grpcio"},
        )
    # Handle signals before the node says it serves: a supervisor may send one
    # as soon as it reads that line.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, sig, stop)
    if node.auth is not None:
        loop.add_signal_handler(signal.SIGHUP, node.auth.reload)
    try:
        await node.start()
    except OSError as exc:
        log.error("%s", exc, extra={"event": "start_failed"})
        return 1
    except EtcdError as exc:
        log.error(
            "%s at start and FLUX_ETCD_AT_START=fail: %s", etcd_failure(exc), exc, extra={"event": "start_failed"}
        )
        return 1
    except AofCorrupt as exc:
        log.error(
            "cannot replay the append-only file: %s; `fluxkv aof-repair %s` cuts it at the last good record "
            "(and keeps a copy), losing what follows",
            exc,
            exc.path,
        )
        return 1
    stopped = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(node.wait_failed())
    await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
    status = 0
    if failed.done():
        log.error("background task failed: %r", failed.exception(), extra={"event": "task_failed"})
        status = 1
    failed.cancel()
    stopped.cancel()
    await node.stop()
    return status


def grpc_server_of(settings: config.Settings) -> str:
    """The gRPC server a node runs on: FLUX_GRPC_SERVER's, except that TLS needs grpcio (pygrpc-native has no
    TLS yet)."""
    return "grpcio" if tls.serves_tls(settings) else settings.grpc_server


def describe_tls(settings: config.Settings) -> str:
    if not tls.serves_tls(settings):
        return "in plaintext"
    described = "over TLS"
    if settings.tls_client_ca_file:
        described += " with client certificates signed by FLUX_TLS_CLIENT_CA_FILE"
    if settings.grpc_server == "native":
        described += " on grpcio, as pygrpc-native has no TLS"
    return described


def advertised_address(settings: config.Settings, port: int) -> str:
    """The address this node registers: FLUX_POD_IP, else the listen address,
    else (listening on every interface) the IP of this host's default route."""
    host = settings.pod_ip or settings.host
    if host in ("0.0.0.0", "::"):
        host = _outbound_ip()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def etcd_failure(exc: EtcdError) -> str:
    """What went wrong with etcd, in a few words that name the settings to look at."""
    if isinstance(exc, EtcdAuthFailed):
        return _etcd_refused(exc.username)
    return "etcd unreachable"


def _etcd_refused(username: str) -> str:
    return f"etcd refused FLUX_ETCD_USERNAME {username!r} and its FLUX_ETCD_PASSWORD"


def _outbound_ip() -> str:
    # Connecting a UDP socket sends nothing; it only picks the route's source address.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere real
            return str(probe.getsockname()[0])
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    log.info("received %s", sig.name, extra={"event": "signal", "signal": sig.name})
    stop.set()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="fluxkv-server",
        description="Run a FluxKV node. Flags override FLUX_* environment variables, which override defaults.",
    )
    parser.add_argument("--version", action="version", version=f"fluxkv {__version__}")
    config.add_arguments(parser)
    settings = config.parse_args(argv, os.environ, parser)
    if settings.auth_tokens_file:
        try:
            load_tokens(settings.auth_tokens_file)
        except TokensFileError as exc:
            parser.exit(2, f"{parser.prog}: error: invalid {TOKENS_SETTING}: {exc}\n")
    logs.configure(settings.log_level, settings.log_format)
    for name in config.unknown_variables(os.environ):
        log.warning("ignoring %s: no such setting", name)
    if settings.workers > 1:
        sys.exit(asyncio.run(workers.supervise(settings)))
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop, grpc_server_of(settings))) as runner:
        sys.exit(runner.run(serve(settings)))
