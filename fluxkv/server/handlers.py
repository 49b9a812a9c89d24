"""Request handling: one plain async function per RPC, protobuf in, protobuf out
(for the streaming Watch, a function that returns an async generator).

Handlers validate, translate and delegate to the store; they hold no state
and know nothing of the transport. A failure is raised as KVError, which the
transport maps to a status code. In a cluster, the node has the key's owner
serve each call about one key (fluxkv/cluster/forwarding.py); MultiGet and MultiSet
check the whole batch, then split it by owner here.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Protocol

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from fluxkv.aof.file import AofCounters, AppendOnlyFile
from fluxkv.cdc.publisher import CdcCounters
from fluxkv.cdc.queue import CdcQueue
from fluxkv.cluster.forwarding import Router
from fluxkv.config import Settings
from fluxkv.core import scan_cursor
from fluxkv.core.changes import ChangeRecord, Op, change_bytes
from fluxkv.core.errors import ErrorKind, KVError, invalid, revision_mismatch, shown
from fluxkv.core.store import NUM_SHARDS, Store
from fluxkv.core.watch import WatchHub
from fluxkv.proto import compat_kv_pb2 as compat_pb2
from fluxkv.proto import kv_pb2 as pb
from fluxkv.rpc import call_context

# A validated SetRequest: key, value, ttl_ms, expect_revision (None: unconditional).
_Write = tuple[str, bytes, int, int | None]
DEFAULT_SCAN_LIMIT = 100
_KV_METHODS = pb.DESCRIPTOR.services_by_name["KV"].methods_by_name


class NodeStatus(Protocol):
    """What Info reports beyond the store."""

    node_id: str
    address: str
    version: str

    def uptime_seconds(self) -> float: ...
    def rss_bytes(self) -> int: ...
    def subsystems(self) -> Sequence[tuple[str, str, str]]: ...
    def cdc_counters(self) -> CdcCounters | None: ...
    def aof_counters(self) -> AofCounters | None: ...
    def cdc_checkpoint_revision(self) -> int: ...
    async def rewrite_aof(self) -> tuple[int, int, float]: ...


class Limits:
    """Request validation against the configured limits."""

    def __init__(self, settings: Settings) -> None:
        self.max_key = settings.max_key_bytes
        self.max_value = settings.max_value_bytes
        self.max_items = settings.max_batch_items
        self.max_batch = settings.max_batch_bytes
        self.max_message = settings.max_message_bytes
        # A key of at most this many characters cannot exceed max_key bytes
        # (UTF-8 needs at most 4 bytes per character): no need to encode it.
        self._short_key = settings.max_key_bytes // 4

    def key(self, key: str) -> None:
        if not key:
            raise invalid("key must not be empty")
        if len(key) > self._short_key:
            size = len(key.encode())
            if size > self.max_key:
                raise invalid(f"key is {size} bytes, over the limit of {self.max_key} bytes (FLUX_MAX_KEY_BYTES)")

    def prefix(self, prefix: str) -> None:
        if len(prefix) > self._short_key and (size := len(prefix.encode())) > self.max_key:
            raise invalid(f"prefix is {size} bytes, over the limit of {self.max_key} bytes (FLUX_MAX_KEY_BYTES)")

    def value(self, size: int) -> None:
        if size > self.max_value:
            raise invalid(f"value is {size} bytes, over the limit of {self.max_value} bytes (FLUX_MAX_VALUE_BYTES)")

    def items(self, count: int, what: str) -> None:
        if count > self.max_items:
            raise invalid(f"{what} has {count} items, over the limit of {self.max_items} (FLUX_MAX_BATCH_ITEMS)")

    def set_request(self, item: pb.SetRequest) -> _Write:
        """Validate a SetRequest; return its key, value, ttl_ms and expect_revision
        (None = unconditional), each read from the message once."""
        key, value, ttl_ms = item.key, item.value, item.ttl_ms
        self.key(key)
        self.value(len(value))
        if ttl_ms < 0:
            raise invalid(f"ttl_ms must not be negative, got {ttl_ms}")
        if not item.HasField("expect_revision"):
            return key, value, ttl_ms, None
        expect = item.expect_revision
        if expect < 0:
            raise invalid(f"expect_revision must be 0 (only if absent) or a revision above 0, got {expect}")
        return key, value, ttl_ms, expect


class WritePath:
    """What a write goes through besides the store: before it is applied, the
    append-only file must be writable and (CDC policy "block") the CDC queue
    must have room; before it is acknowledged, the file must hold it as its
    fsync policy promises.

    The waits are coroutines that a write awaits only when it must: a handler
    calls check() or, when `gated`, awaits admit(); and awaits acknowledge()
    only if must_wait()."""

    def __init__(self, gate: CdcQueue | None, aof: AppendOnlyFile | None) -> None:
        self._gate = gate
        self._aof = aof
        self.gated = gate is not None

    def check(self) -> None:
        """What admit() checks without waiting: that the file can be written."""
        if self._aof is not None:
            self._aof.check_writable()

    async def admit(self, events: int, nbytes: int) -> None:
        self.check()
        if self._gate is not None:
            await self._gate.admit(events, nbytes, call_context.time_remaining)

    def must_wait(self, revision: int) -> bool:
        aof = self._aof
        return aof is not None and aof.must_wait(revision)

    async def acknowledge(self, revision: int) -> None:
        """Return once the write at `revision` may be acknowledged (if must_wait())."""
        aof = self._aof
        if aof is not None and aof.must_wait(revision):
            await aof.acknowledged(revision)


class KVHandlers:
    """fluxkv.v1.KV

    `writes`: see WritePath. `watch_hub`: the store's recent changes, which
    Watch streams from.
    """

    def __init__(
        self,
        store: Store,
        settings: Settings,
        node: NodeStatus,
        writes: WritePath,
        *,
        watch_hub: WatchHub,
        router: Router | None = None,
    ) -> None:
        self._store = store
        self._limits = Limits(settings)
        self._node = node
        self._writes = writes
        self._router = router
        self._watch_hub = watch_hub

    async def get(self, request: pb.GetRequest) -> pb.GetResponse:
        key = request.key
        self._limits.key(key)
        item = self._store.get(key)
        if item is None:
            return pb.GetResponse()
        return pb.GetResponse(found=True, value=item.value, mod_revision=item.mod_revision, ttl_ms=item.ttl_ms)

    async def set(self, request: pb.SetRequest) -> pb.SetResponse:
        key, value, ttl_ms, expect = self._limits.set_request(request)
        writes = self._writes
        if writes.gated:
            await writes.admit(1, change_bytes(key, value))
        else:
            writes.check()
        outcome = self._store.set(key, value, ttl_ms, expect)
        if not outcome.applied:
            raise _condition_failed(key, expect, outcome.revision)
        if writes.must_wait(outcome.revision):
            await writes.acknowledge(outcome.revision)
        return pb.SetResponse(revision=outcome.revision, created=not outcome.existed)

    async def delete(self, request: pb.DeleteRequest) -> pb.DeleteResponse:
        self._limits.key(request.key)
        expect = None
        if request.HasField("expect_revision"):
            expect = request.expect_revision
            if expect <= 0:
                raise invalid(f"expect_revision of a Delete must be a revision above 0, got {expect}")
        writes = self._writes
        if writes.gated:
            await writes.admit(1, change_bytes(request.key, None))
        else:
            writes.check()
        outcome = self._store.delete(request.key, expect)
        if not outcome.applied:
            raise _condition_failed(request.key, expect, outcome.revision)
        if outcome.existed and writes.must_wait(outcome.revision):
            await writes.acknowledge(outcome.revision)
        return pb.DeleteResponse(deleted=outcome.existed, revision=outcome.revision)

    async def multi_get(self, request: pb.MultiGetRequest) -> pb.MultiGetResponse:
        keys = request.keys
        self._limits.items(len(keys), "MultiGet")
        check = self._limits.key
        for i, key in enumerate(keys):
            try:
                check(key)
            except KVError as exc:
                raise invalid(f"keys[{i}]: {exc.message}") from None
        if self._router is None:
            response = pb.MultiGetResponse()
            size = self._gets(keys, response.results)
        else:
            router = self._router

            async def local(indexes: list[int]) -> list[pb.GetResponse]:
                part = pb.MultiGetResponse()
                self._gets([keys[i] for i in indexes], part.results)
                return list(part.results)

            async def remote(owner: str, indexes: list[int]) -> list[pb.GetResponse]:
                part = pb.MultiGetRequest(keys=[keys[i] for i in indexes])
                return list((await router.forward(owner, _KV_METHODS["MultiGet"], part)).results)

            results = await router.split(keys, local, remote)
            size = sum(len(r.value) for r in results)
            response = pb.MultiGetResponse(results=results)
        if size > self._limits.max_batch:
            raise KVError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"the values of these {len(keys)} keys add up to {size} bytes, over the limit of "
                f"{self._limits.max_batch} bytes (FLUX_MAX_BATCH_BYTES); ask for fewer keys per call",
            )
        return response

    def _gets(self, keys: Sequence[str], results: RepeatedCompositeFieldContainer[pb.GetResponse]) -> int:
        """Add each key's GetResponse to `results` (added in place: no copy); the values' total size."""
        get, add = self._store.get, results.add
        size = 0
        for key in keys:
            item = get(key)
            if item is None:
                add()
            else:
                add(found=True, value=item.value, mod_revision=item.mod_revision, ttl_ms=item.ttl_ms)
                size += len(item.value)
        return size

    async def multi_set(self, request: pb.MultiSetRequest) -> pb.MultiSetResponse:
        items = request.items
        self._limits.items(len(items), "MultiSet")
        check = self._limits.set_request
        writes: list[_Write] = []
        for i, item in enumerate(items):
            try:
                writes.append(check(item))
            except KVError as exc:
                raise invalid(f"items[{i}]: {exc.message}") from None
        size = sum([change_bytes(key, value) for key, value, _, _ in writes])
        if size > self._limits.max_batch:
            raise invalid(
                f"MultiSet carries {size} bytes of keys and values, over the limit of "
                f"{self._limits.max_batch} bytes (FLUX_MAX_BATCH_BYTES)"
            )
        if self._router is None:
            response = pb.MultiSetResponse()
            await self._sets(writes, size, response.results)
            return response
        router = self._router

        async def local(indexes: list[int]) -> list[pb.SetResult]:
            mine = [writes[i] for i in indexes]
            part = pb.MultiSetResponse()
            await self._sets(mine, sum(change_bytes(key, value) for key, value, _, _ in mine), part.results)
            return list(part.results)

        async def remote(owner: str, indexes: list[int]) -> list[pb.SetResult]:
            part = pb.MultiSetRequest(items=[items[i] for i in indexes])
            return list((await router.forward(owner, _KV_METHODS["MultiSet"], part)).results)

        return pb.MultiSetResponse(results=await router.split([key for key, _, _, _ in writes], local, remote))

    async def _sets(
        self, writes: Sequence[_Write], size: int, results: RepeatedCompositeFieldContainer[pb.SetResult]
    ) -> None:
        """Apply the writes in order, adding each one's SetResult to `results`."""
        path = self._writes
        if path.gated:
            await path.admit(len(writes), size)
        else:
            path.check()
        set_, add = self._store.set, results.add
        last = 0
        for key, value, ttl_ms, expect in writes:
            applied, revision, existed = set_(key, value, ttl_ms, expect)
            add(applied=applied, revision=revision, created=not existed)
            if applied:
                last = revision
        if last and path.must_wait(last):
            await path.acknowledge(last)

    async def scan(self, request: pb.ScanRequest) -> pb.ScanResponse:
        limit = request.limit or min(DEFAULT_SCAN_LIMIT, self._limits.max_items)
        if limit > self._limits.max_items:
            raise invalid(f"limit is {limit}, over the limit of {self._limits.max_items} (FLUX_MAX_BATCH_ITEMS)")
        prefix = request.prefix
        start = scan_cursor.decode(request.cursor, prefix) if request.cursor else scan_cursor.start()
        items, resume = self._store.scan(prefix, start, limit, self._limits.max_batch, request.include_values)
        return pb.ScanResponse(
            items=[pb.KeyValue(key=i.key, value=i.value, mod_revision=i.mod_revision, ttl_ms=i.ttl_ms) for i in items],
            cursor=scan_cursor.encode(resume, prefix) if resume is not None else "",
        )

    async def info(self, request: pb.InfoRequest) -> pb.InfoResponse:
        counts = self._store.shard_key_counts()
        total = sum(counts)
        limits = self._limits
        return pb.InfoResponse(
            node_id=self._node.node_id,
            address=self._node.address,
            version=self._node.version,
            revision=self._store.revision,
            key_count=total,
            data_bytes=self._store.data_bytes,
            rss_bytes=self._node.rss_bytes(),
            uptime_seconds=self._node.uptime_seconds(),
            shards=pb.ShardSummary(
                shards=NUM_SHARDS, min_keys=min(counts), max_keys=max(counts), mean_keys=total / NUM_SHARDS
            ),
            limits=pb.Limits(
                max_key_bytes=limits.max_key,
                max_value_bytes=limits.max_value,
                max_batch_items=limits.max_items,
                max_batch_bytes=limits.max_batch,
                max_message_bytes=limits.max_message,
            ),
            subsystems=[pb.Subsystem(name=n, state=s, detail=d) for n, s, d in self._node.subsystems()],
            cdc=cdc_status(self._node.cdc_counters()),
            epoch=self._store.epoch,
            aof=aof_status(self._node.aof_counters(), self._node.cdc_checkpoint_revision()),
        )

    async def rewrite_aof(self, request: pb.RewriteAofRequest) -> pb.RewriteAofResponse:
        before, after, seconds = await self._node.rewrite_aof()
        return pb.RewriteAofResponse(size_before=before, size_after=after, seconds=seconds)

    def watch(self, request: pb.WatchRequest) -> AsyncGenerator[pb.WatchResponse, None]:
        """Check the request and fix where the watch starts now, so that the
        transport's headers tell the caller it is live; changes follow."""
        self._limits.prefix(request.prefix)
        if request.start_revision < 0:
            raise invalid(
                f"start_revision must be 0 (from the next change) or a revision above 0, got {request.start_revision}"
            )
        limits = self._limits
        batches = self._watch_hub.watch(request.prefix, request.start_revision, limits.max_items, limits.max_batch)
        return _watch_responses(batches)


class CompatHandlers:
    """service.KVService, Flux-KV's wire API."""

    def __init__(self, store: Store, settings: Settings, writes: WritePath) -> None:
        self._store = store
        self._limits = Limits(settings)
        self._writes = writes

    async def set(self, request: compat_pb2.SetRequest) -> compat_pb2.SetResponse:
        self._limits.key(request.key)
        value = request.value.encode()
        self._limits.value(len(value))
        await self._writes.admit(1, change_bytes(request.key, value))
        revision = self._store.set(request.key, value).revision
        if self._writes.must_wait(revision):
            await self._writes.acknowledge(revision)
        return compat_pb2.SetResponse(success=True)

    async def get(self, request: compat_pb2.GetRequest) -> compat_pb2.GetResponse:
        self._limits.key(request.key)
        item = self._store.get(request.key)
        if item is None:
            return compat_pb2.GetResponse(found=False)
        try:
            value = item.value.decode()
        except UnicodeDecodeError:
            raise KVError(
                ErrorKind.FAILED_PRECONDITION,
                f"the value of key {shown(request.key)} is not valid UTF-8, which service.KVService cannot "
                "carry; read it with fluxkv.v1.KV/Get",
            ) from None
        return compat_pb2.GetResponse(value=value, found=True)

    async def delete(self, request: compat_pb2.DelRequest) -> compat_pb2.DelResponse:
        self._limits.key(request.key)
        await self._writes.admit(1, change_bytes(request.key, None))
        outcome = self._store.delete(request.key)
        if outcome.existed:
            await self._writes.acknowledge(outcome.revision)
        return compat_pb2.DelResponse(success=True)


def cdc_status(c: CdcCounters | None) -> pb.CdcStatus:
    """Info's CDC status, field by field: the wire API does not follow a renamed counter."""
    if c is None:
        return pb.CdcStatus()
    return pb.CdcStatus(
        enabled=True,
        connection=c.connection,
        full_policy=c.full_policy,
        queued=c.queued,
        published=c.published,
        confirmed=c.confirmed,
        republished=c.republished,
        dropped=c.dropped,
        queue_depth=c.queue_depth,
        queue_bytes=c.queue_bytes,
        writes_delayed=c.writes_delayed,
        writes_refused=c.writes_refused,
        confirmed_revision=c.confirmed_revision,
        spilled=c.spilled,
    )


def aof_status(c: AofCounters | None, cdc_checkpoint_revision: int) -> pb.AofStatus:
    """Info's append-only file status, field by field, with the revision of
    CDC's checkpoint beside the file (the publisher keeps it)."""
    if c is None:
        return pb.AofStatus()
    return pb.AofStatus(
        enabled=True,
        path=c.path,
        fsync_policy=c.fsync_policy,
        state=c.state,
        size_bytes=c.size_bytes,
        base_size_bytes=c.base_size_bytes,
        written_revision=c.written_revision,
        durable_revision=c.durable_revision,
        records_written=c.records_written,
        batches_written=c.batches_written,
        fsyncs=c.fsyncs,
        writes_delayed=c.writes_delayed,
        rewrites=c.rewrites,
        rewrite_in_progress=c.rewrite_in_progress,
        last_rewrite_seconds=c.last_rewrite_seconds,
        cdc_checkpoint_revision=cdc_checkpoint_revision,
        error=c.error,
    )


def _condition_failed(key: str, expected: int | None, current: int) -> KVError:
    if expected == 0:
        state = f"exists at revision {current}; expect_revision 0 requires it absent"
    elif current == 0:
        state = f"does not exist; expected revision {expected}"
    else:
        state = f"is at revision {current}, not the expected {expected}"
    return KVError(ErrorKind.ABORTED, f"condition failed: key {shown(key)} {state}", revision_mismatch(key, current))


_EVENT_OPS = {Op.SET: pb.Event.OP_SET, Op.DELETE: pb.Event.OP_DELETE, Op.EXPIRE: pb.Event.OP_EXPIRE}


async def _watch_responses(
    batches: AsyncGenerator[list[ChangeRecord], None],
) -> AsyncGenerator[pb.WatchResponse, None]:
    async with aclosing(batches):
        async for batch in batches:
            yield pb.WatchResponse(
                events=[
                    pb.Event(
                        revision=r.revision,
                        op=_EVENT_OPS[r.op],
                        key=r.key,
                        value=r.value or b"",
                        expires_at_ms=r.expires_at_ms,
                        ts_ms=r.ts_ms,
                        shard=r.shard,
                    )
                    for r in batch
                ]
            )
