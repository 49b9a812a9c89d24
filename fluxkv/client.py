"""The FluxKV client SDK: `Client` (asyncio) and `SyncClient`, its blocking twin.

Routing. A client learns the nodes' addresses from a `NodeSource` (a fixed list
is `StaticNodes`; etcd discovery is another) and sends each key to its owner on
a consistent-hash ring (fluxkv/cluster/hash_ring.py, docs/routing.md), over one gRPC
channel per node, opened on first use and kept until the node leaves or the
client closes. Multi-key calls are split by owner, each owner's part in chunks
within the node's batch limits; owners are called at once, each owner's chunks
one after another (so a key given twice is written in order), and the results
come back in request order. A MultiGet whose answer would pass the node's byte
limit (the values' sizes are unknown beforehand) is asked again in halves.
Scan and Watch cover every node.

Deadlines and retries. Every call has a deadline (the client's `timeout`, or
the call's own); it covers the whole call, retries included (for scan, each
page; for watch, setting up its streams). A call that fails with UNAVAILABLE (a node down, unreachable or shutting
down) is tried again after an exponential backoff with jitter, at most
`Retry.attempts` times in all and never past the deadline, and the key's owner
is looked up again each time: the ring may have changed. Nothing else is
retried. Failures are typed: see FluxKVError and its subclasses.

Tracing. Each call to a node is an OpenTelemetry CLIENT span (named
"fluxkv.v1.KV/Set", ...) whose context goes to the node in the call's
`traceparent` metadata, so the node's span is its child. The spans come from
the application's tracer provider (the global one, or `tracer_provider=`); an
application that sets none up gets no-op spans, which cost a few hundred
nanoseconds per call and send nothing. Watch streams are not traced.

One core, two faces. All of the logic lives in the asyncio `Client`.
`SyncClient` owns a private event loop in a daemon thread and runs Client's
coroutines there, one hop between threads per call (per page for scan, per
message for watch), so the twins cannot drift apart. Sharing only request
building with grpc's blocking stubs would mean a second copy of the retries,
the fan-out and the merging of watch streams, with threads in place of tasks.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import threading
from collections import deque
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any, Literal, ParamSpec, Protocol, Self, TypeVar, runtime_checkable

import grpc
from google.protobuf.message import Message
from opentelemetry import trace

from fluxkv.cluster.discovery import DEFAULT_PREFIX, EtcdNodes
from fluxkv.cluster.hash_ring import DEFAULT_VNODES, HashRing
from fluxkv.core.backoff import jittered_delay
from fluxkv.core.errors import ErrorKind, current_revision
from fluxkv.proto import kv_pb2 as pb
from fluxkv.proto import kv_pb2_grpc
from fluxkv.rpc import status as rpc_status
from fluxkv.rpc.spans import client_failed, client_span
from fluxkv.security.tls import TLS, aio_channel
from fluxkv.version import __version__

T = TypeVar("T")
P = ParamSpec("P")
Op = Literal["set", "delete", "expire"]

DEFAULT_TIMEOUT_S = 5.0
# The node's defaults (FLUX_MAX_BATCH_ITEMS, FLUX_MAX_BATCH_BYTES).
DEFAULT_MAX_BATCH_ITEMS = 1000
DEFAULT_MAX_BATCH_BYTES = 8 * 1024 * 1024
# The node bounds its answers (FLUX_MAX_MESSAGE_BYTES, 16 MiB by default), over grpcio's 4 MiB default.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1)]
# Watch messages held for the reader; then the streams wait (and gRPC flow control holds the nodes back).
_WATCH_BUFFER = 16


# -- node sources ---------------------------------------------------------------


@runtime_checkable
class NodeSource(Protocol):
    """Where a client learns the nodes' addresses ("host:port", exactly as the
    nodes register them). StaticNodes is one; fluxkv.cluster.discovery.Discovery (etcd)
    is another. The client does not start or stop its source."""

    @property
    def addresses(self) -> Collection[str]:
        """The nodes' addresses now."""
        ...

    def on_change(self, listener: Callable[[Collection[str]], None]) -> object:
        """Call `listener(addresses)` with the whole new set after every change,
        from any thread. The client's listener returns at once and never raises."""
        ...


class StaticNodes:
    """A fixed set of addresses."""

    def __init__(self, addresses: Iterable[str]) -> None:
        self.addresses = frozenset(addresses)
        if not self.addresses or not all(self.addresses):
            raise ValueError(f"expected one or more non-empty node addresses, got {sorted(self.addresses)}")

    def on_change(self, listener: Callable[[Collection[str]], None]) -> None:
        """Never calls `listener`: the set does not change."""


# -- results and options --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyValue:
    """A key as read: its value, the revision of its last write, and its remaining TTL (0: none)."""

    key: str
    value: bytes
    mod_revision: int
    ttl_ms: int


@dataclass(frozen=True, slots=True)
class SetItem:
    """One write of a multi_set, with its own TTL and compare-and-set condition (as in set)."""

    key: str
    value: bytes
    ttl_ms: int = 0
    expect_revision: int | None = None


@dataclass(frozen=True, slots=True)
class SetResult:
    """One item's outcome in multi_set: when applied, the revision of the write;
    otherwise (its condition failed) the key's current revision, 0 if absent."""

    applied: bool
    revision: int
    created: bool


@dataclass(frozen=True, slots=True)
class Deleted:
    """delete's outcome: whether a key was deleted, and the revision of the deletion
    (when nothing was deleted: the node's revision then). True when deleted."""

    deleted: bool
    revision: int

    def __bool__(self) -> bool:
        return self.deleted


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change on `node`. Revisions count per node: resume a node's stream
    with the revision after its last event."""

    node: str
    revision: int
    op: Op
    key: str
    value: bytes  # the new value of a set; empty otherwise
    expires_at_ms: int  # a set with a TTL: its deadline in Unix milliseconds; otherwise 0
    ts_ms: int  # when the node applied it, in Unix milliseconds


@dataclass(frozen=True, slots=True)
class Retry:
    """How a call that failed with UNAVAILABLE is tried again: at most `attempts`
    attempts in all, within the call's deadline. Before attempt n + 1 the client
    waits between half and all of min(max_backoff_s, backoff_s * 2 ** (n - 1)),
    at random (equal jitter, fluxkv/core/backoff.py: clients that failed together do
    not retry together). The defaults wait at most 0.1 + 0.2 + 0.4 s in all."""

    attempts: int = 4
    backoff_s: float = 0.1
    max_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError(f"expected attempts >= 1 and backoffs >= 0, got {self}")

    def delay(self, failed: int) -> float:
        """Seconds to wait after `failed` attempts."""
        return jittered_delay(self.backoff_s, self.max_backoff_s, failed - 1)


# -- errors ---------------------------------------------------------------------


class FluxKVError(Exception):
    """A call failed. `code` is the gRPC status, `message` says why, `node` is
    the address that answered (None when no node was called)."""

    def __init__(self, code: grpc.StatusCode, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.node = node

    def __str__(self) -> str:
        origin = f" from {self.node}" if self.node else ""
        return f"{self.message} ({self.code.name}{origin})"


class InvalidRequest(FluxKVError):
    """INVALID_ARGUMENT: the node refused the request (a limit or a rule; the message names it)."""


class ConditionFailed(FluxKVError):
    """ABORTED: an expect_revision condition failed and nothing was written.
    `revision` is the key's current revision (0: absent) as the node reported
    it in the error's details (a REVISION_MISMATCH ErrorInfo), None if it sent none."""

    def __init__(self, code: grpc.StatusCode, message: str, node: str | None = None) -> None:
        super().__init__(code, message, node)
        self.revision: int | None = None


class Unavailable(FluxKVError):
    """UNAVAILABLE on every attempt (`attempts` of them), or until the deadline
    left no time for another: the node is down, unreachable or shutting down."""

    attempts = 1

    def __str__(self) -> str:
        tries = f"; gave up after {self.attempts} attempts" if self.attempts > 1 else ""
        return super().__str__() + tries


class NoNodes(Unavailable):
    """The node source knows no node (yet)."""


class DeadlineExceeded(FluxKVError):
    """DEADLINE_EXCEEDED: no answer within the call's deadline."""


class Unauthenticated(FluxKVError):
    """UNAUTHENTICATED: the node wants a token, and this client sent none or one it does not know."""


class PermissionDenied(FluxKVError):
    """PERMISSION_DENIED: the token's role or key prefixes do not allow the call (the message says which)."""


_ERRORS: dict[ErrorKind | None, type[FluxKVError]] = {
    ErrorKind.INVALID_ARGUMENT: InvalidRequest,
    ErrorKind.ABORTED: ConditionFailed,
    ErrorKind.UNAVAILABLE: Unavailable,
    ErrorKind.DEADLINE_EXCEEDED: DeadlineExceeded,
    ErrorKind.UNAUTHENTICATED: Unauthenticated,
    ErrorKind.PERMISSION_DENIED: PermissionDenied,
}


def _error(exc: grpc.aio.AioRpcError, node: str) -> FluxKVError:
    return _status_error(exc.code(), exc.details(), exc.trailing_metadata(), node)


def _status_error(
    code: grpc.StatusCode, details: str | None, trailing_metadata: rpc_status.Metadata | None, node: str
) -> FluxKVError:
    """The FluxKVError of a call that failed with this status."""
    error = _ERRORS.get(rpc_status.kind_of_status(code), FluxKVError)(code, details or code.name.lower(), node)
    if isinstance(error, ConditionFailed):  # the message is for people; a program reads the details
        error.revision = current_revision(rpc_status.error_info(trailing_metadata))
    return error


_OPS: dict[int, Op] = {
    pb.Event.OP_SET: "set",
    pb.Event.OP_DELETE: "delete",
    pb.Event.OP_EXPIRE: "expire",
}


# -- the asyncio client -----------------------------------------------------------


@dataclass(slots=True)
class _Binding:
    """What a client shares with its with_token() views: the loop they serve, and whether they are closed."""

    loop: asyncio.AbstractEventLoop | None = None
    closed: bool = False


class Client:
    """A FluxKV cluster, from asyncio. Use it from one event loop (the first one
    it is used in) and close it, or use `async with Client(...) as client:`.

    `nodes` is an address ("host:port"), a list of them, or a NodeSource.
    `timeout` is the default deadline of each call in seconds, `retry` the policy
    for UNAVAILABLE, `vnodes` the ring's points per node (FLUX_RING_VNODES: the
    nodes and every client must agree), and multi-key calls send at most
    `max_batch_items` keys and (multi_set) `max_batch_bytes` of keys and values
    per request: the nodes' FLUX_MAX_BATCH_ITEMS and FLUX_MAX_BATCH_BYTES.
    `tracer_provider` makes the calls' spans (default: OpenTelemetry's global one).
    `tls` connects over TLS (`TLS()`: verified with the system's CA certificates), and
    `token` is sent with every call as `authorization: Bearer <token>` (docs/security.md).
    """

    def __init__(
        self,
        nodes: str | Iterable[str] | NodeSource,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: Retry = Retry(),
        vnodes: int = DEFAULT_VNODES,
        max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        tracer_provider: trace.TracerProvider | None = None,
        tls: TLS | None = None,
        token: str | None = None,
    ) -> None:
        if isinstance(nodes, str):
            nodes = [nodes]
        self._source = nodes if isinstance(nodes, NodeSource) else StaticNodes(nodes)
        self._timeout = _positive("timeout", timeout)
        self._retry = retry
        self._ring = HashRing(vnodes=vnodes)
        self._max_items = int(_positive("max_batch_items", max_batch_items))
        self._max_bytes = int(_positive("max_batch_bytes", max_batch_bytes))
        self._tracer = trace.get_tracer("fluxkv.client", __version__, tracer_provider)
        self._credentials = None if tls is None else tls.channel_credentials()
        self._auth = [] if token is None else [("authorization", f"Bearer {token}")]
        self._channels: dict[str, tuple[grpc.aio.Channel, Any]] = {}  # node -> (channel, KVStub)
        self._binding = _Binding()
        self._closing: set[asyncio.Task[None]] = set()  # channels of departed nodes, finishing their calls

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every channel (calls in flight are cancelled). Closing again does nothing."""
        self._binding.closed = True
        channels = [channel for channel, _ in self._channels.values()]
        self._channels.clear()
        await asyncio.gather(*(channel.close() for channel in channels), *self._closing)

    @property
    def nodes(self) -> list[str]:
        """The nodes' addresses now, in address order. Read it on the client's event loop."""
        return sorted(self._bound_ring().nodes)

    def with_token(self, token: str | None) -> Client:
        """This client sending `token` (None: no token) instead of its own, over the
        same channels and ring: for a program that passes each of its callers' tokens
        on (fluxkv-gateway). Cheap enough to make one per call; closing any of them
        closes them all. Call it on the client's event loop."""
        self._bound_ring()  # bound first, so that the copy does not listen to the source again
        view = copy.copy(self)
        view._auth = [] if token is None else [("authorization", f"Bearer {token}")]
        return view

    # -- single keys

    async def get(self, key: str, *, timeout: float | None = None) -> KeyValue | None:
        """The key, or None if it does not exist (or has expired)."""
        answer: pb.GetResponse = await self._on_owner(key, "Get", pb.GetRequest(key=key), timeout)
        return KeyValue(key, answer.value, answer.mod_revision, answer.ttl_ms) if answer.found else None

    async def set(
        self,
        key: str,
        value: bytes,
        ttl_ms: int = 0,
        expect_revision: int | None = None,
        *,
        timeout: float | None = None,
    ) -> int:
        """Write `value` and return the write's revision. `ttl_ms` > 0 expires the
        key that many milliseconds later (0: never). With `expect_revision`, write
        only if the key is at that revision (0: only if it is absent), else raise
        ConditionFailed."""
        request = pb.SetRequest(key=key, value=value, ttl_ms=ttl_ms, expect_revision=expect_revision)
        answer: pb.SetResponse = await self._on_owner(key, "Set", request, timeout)
        return answer.revision

    async def delete(self, key: str, expect_revision: int | None = None, *, timeout: float | None = None) -> Deleted:
        """Delete the key; the outcome is false if it did not exist. With `expect_revision`
        (> 0), delete only if the key is at that revision, else raise ConditionFailed."""
        request = pb.DeleteRequest(key=key, expect_revision=expect_revision)
        answer: pb.DeleteResponse = await self._on_owner(key, "Delete", request, timeout)
        return Deleted(answer.deleted, answer.revision)

    # -- many keys

    async def multi_get(self, keys: Iterable[str], *, timeout: float | None = None) -> list[KeyValue | None]:
        """Each key (None if absent), in the order given."""
        keys = list(keys)

        async def send(node: str, chunk: list[int], deadline: float) -> list[KeyValue | None]:
            request = pb.MultiGetRequest(keys=[keys[i] for i in chunk])
            try:
                answer: pb.MultiGetResponse = await self._invoke(node, "MultiGet", request, deadline)
            except FluxKVError as exc:
                # The answer would pass the node's byte limit: values' sizes are
                # unknown beforehand, so ask for half the keys at a time.
                if exc.code != grpc.StatusCode.RESOURCE_EXHAUSTED or len(chunk) == 1:
                    raise
                half = len(chunk) // 2
                return await send(node, chunk[:half], deadline) + await send(node, chunk[half:], deadline)
            return [
                KeyValue(keys[i], r.value, r.mod_revision, r.ttl_ms) if r.found else None
                for i, r in zip(chunk, answer.results, strict=True)
            ]

        return await self._split(keys, None, send, timeout)

    async def multi_set(
        self, items: Mapping[str, bytes] | Iterable[tuple[str, bytes] | SetItem], *, timeout: float | None = None
    ) -> list[SetResult]:
        """Write each item (key and value, or a SetItem); one result per item, in
        the order given. Each key is written atomically on its own, not the batch:
        an item whose condition fails is reported (applied False), the others are
        still written."""
        pairs = items.items() if isinstance(items, Mapping) else items
        requests = [
            pb.SetRequest(key=i.key, value=i.value, ttl_ms=i.ttl_ms, expect_revision=i.expect_revision)
            if isinstance(i, SetItem)
            else pb.SetRequest(key=i[0], value=i[1])
            for i in pairs
        ]

        async def send(node: str, chunk: list[int], deadline: float) -> list[SetResult]:
            request = pb.MultiSetRequest(items=[requests[i] for i in chunk])
            answer: pb.MultiSetResponse = await self._invoke(node, "MultiSet", request, deadline)
            return [SetResult(r.applied, r.revision, r.created) for r in answer.results]

        sizes = [len(r.key.encode()) + len(r.value) for r in requests]
        return await self._split([r.key for r in requests], sizes, send, timeout)

    # -- every node

    async def scan(
        self, prefix: str = "", *, include_values: bool = True, page_size: int = 100, timeout: float | None = None
    ) -> AsyncGenerator[KeyValue, None]:
        """Every key that starts with `prefix`, node after node (in address order),
        page by page; `timeout` is the deadline of each page. A key that exists
        for the whole scan comes exactly once; keys written during it may or may
        not come."""
        async for page in self._scan_pages(prefix, include_values, page_size, timeout):
            for item in page:
                yield item

    async def scan_page(
        self,
        prefix: str = "",
        cursor: str = "",
        *,
        limit: int = 100,
        include_values: bool = True,
        timeout: float | None = None,
    ) -> tuple[list[KeyValue], str]:
        """One page of scan(): at most `limit` keys from one node, and the cursor
        of the next page ("" after the last page), for a caller that pages by
        itself (fluxkv-gateway's scan route). A page is empty only when the scan
        is over. The cursor is opaque and URL-safe; it names the node it resumes
        on, and the scan goes on in address order, with the nodes known then.
        A cursor that is not one gets InvalidRequest."""
        node, node_cursor = _parse_scan_cursor(cursor) if cursor else (None, "")
        members = self._members()
        if node is None:
            node = members[0]
        elif node not in members:  # it left: go on with the next node in address order
            node, node_cursor = next((m for m in members if m > node), None), ""
        while node is not None:
            request = pb.ScanRequest(prefix=prefix, cursor=node_cursor, limit=limit, include_values=include_values)
            deadline = self._deadline(timeout)
            page: pb.ScanResponse = await self._retrying(
                partial(self._invoke, node, "Scan", request, deadline), deadline
            )
            items = [KeyValue(i.key, i.value, i.mod_revision, i.ttl_ms) for i in page.items]
            if page.cursor:
                return items, _scan_cursor(node, page.cursor)
            node = next((m for m in self._members() if m > node), None)
            if items:
                return items, _scan_cursor(node, "") if node is not None else ""
            node_cursor = ""
        return [], ""

    async def revisions(self, *, timeout: float | None = None) -> dict[str, int]:
        """Each node's current revision, by address (from its Info): a watch from
        each one + 1 misses no change made after this call, and has a position
        for every node to resume from, even one that has no change to send yet."""
        nodes = self._members()
        deadline = self._deadline(timeout)
        answers: list[pb.InfoResponse] = await _all(
            self._retrying(partial(self._invoke, node, "Info", pb.InfoRequest(), deadline), deadline) for node in nodes
        )
        return {node: answer.revision for node, answer in zip(nodes, answers, strict=True)}

    def watch(
        self, prefix: str = "", start_revision: int | Mapping[str, int] = 0, *, timeout: float | None = None
    ) -> Watch:
        """The changes to keys that start with `prefix` on every node, as one
        stream of WatchEvents: `async with client.watch(prefix) as events: async
        for event in events: ...`. `start_revision` is 0 (from the next change),
        a revision, or a revision per node (missing nodes: 0); see Watch."""
        return Watch(self, prefix, start_revision, timeout)

    # -- the core

    async def _scan_pages(
        self, prefix: str, include_values: bool, page_size: int, timeout: float | None
    ) -> AsyncGenerator[list[KeyValue], None]:
        cursor = ""
        while True:
            page, cursor = await self.scan_page(
                prefix, cursor, limit=page_size, include_values=include_values, timeout=timeout
            )
            yield page
            if not cursor:
                break

    async def _on_owner(self, key: str, method: str, request: Message, timeout: float | None) -> Any:
        """Call `method` on the key's owner, looked up again on every attempt."""
        deadline = self._deadline(timeout)
        return await self._retrying(lambda: self._invoke(self._owner(key), method, request, deadline), deadline)

    async def _split(
        self,
        keys: list[str],
        sizes: list[int] | None,
        send: Callable[[str, list[int], float], Awaitable[list[T]]],
        timeout: float | None,
    ) -> list[T]:
        """A multi-key call: `send(node, indexes, deadline)` answers the items at
        `indexes` from their owner. What failed with UNAVAILABLE is grouped again
        by the ring of the moment and retried."""
        deadline = self._deadline(timeout)
        results: dict[int, T] = {}
        pending = list(range(len(keys)))

        async def from_owner(node: str, indexes: list[int]) -> tuple[list[int], Unavailable | None]:
            """Send this owner's chunks in order; on UNAVAILABLE, return the indexes not done and the error."""
            chunks = self._chunks(indexes, sizes)
            for chunk in chunks:
                try:
                    part = await send(node, chunk, deadline)
                except Unavailable as exc:
                    return chunk + [i for rest in chunks for i in rest], exc
                results.update(zip(chunk, part, strict=True))
            return [], None

        async def attempt() -> None:
            nonlocal pending
            groups: dict[str, list[int]] = {}
            for i in pending:
                groups.setdefault(self._owner(keys[i]), []).append(i)
            outcomes = await _all(from_owner(node, indexes) for node, indexes in groups.items())
            pending = sorted(i for left, _ in outcomes for i in left)
            for _, error in outcomes:
                if error is not None:
                    raise error

        await self._retrying(attempt, deadline)
        return [results[i] for i in range(len(keys))]

    def _chunks(self, indexes: list[int], sizes: list[int] | None) -> Iterator[list[int]]:
        """`indexes` in runs of at most max_batch_items items and max_batch_bytes
        bytes (an item over the bytes goes alone, for the node to refuse)."""
        chunk: list[int] = []
        total = 0
        for i in indexes:
            size = sizes[i] if sizes else 0
            if chunk and (len(chunk) == self._max_items or total + size > self._max_bytes):
                yield chunk
                chunk, total = [], 0
            chunk.append(i)
            total += size
        if chunk:
            yield chunk

    async def _retrying(self, attempt: Callable[[], Awaitable[T]], deadline: float) -> T:
        """`attempt()`, tried again after Unavailable as the Retry policy allows."""
        loop = asyncio.get_running_loop()
        failed = 0
        while True:
            try:
                return await attempt()
            except Unavailable as exc:
                failed += 1
                delay = self._retry.delay(failed)
                if failed >= self._retry.attempts or loop.time() + delay >= deadline:
                    exc.attempts = failed
                    raise
            await asyncio.sleep(delay)

    async def _invoke(self, node: str, method: str, request: Message, deadline: float) -> Any:
        """One call of `method` on `node`, due by `deadline` (loop time); gRPC failures become FluxKVErrors."""
        seconds = deadline - asyncio.get_running_loop().time()
        with client_span(self._tracer, f"fluxkv.v1.KV/{method}", node) as (span, trace_metadata):
            metadata = self._auth + trace_metadata if trace_metadata else self._auth
            try:
                return await getattr(self._stub(node), method)(request, timeout=seconds, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                client_failed(span, exc.code())
                raise _error(exc, node) from None

    def _stub(self, node: str) -> Any:
        entry = self._channels.get(node)
        if entry is None:
            if node not in self._ring.nodes:  # it left: keep no channel to it
                raise Unavailable(grpc.StatusCode.UNAVAILABLE, "the node left the cluster", node)
            channel = aio_channel(node, self._credentials, _CHANNEL_OPTIONS)
            entry = self._channels[node] = (channel, kv_pb2_grpc.KVStub(channel))  # type: ignore[no-untyped-call]
        return entry[1]

    def _owner(self, key: str) -> str:
        try:
            return self._bound_ring().owner(key)
        except LookupError:
            raise NoNodes(grpc.StatusCode.UNAVAILABLE, "no FluxKV node is known: the node source is empty") from None

    def _members(self) -> list[str]:
        """Every node now, in address order; NoNodes if there is none."""
        nodes = sorted(self._bound_ring().nodes)
        if not nodes:
            raise NoNodes(grpc.StatusCode.UNAVAILABLE, "no FluxKV node is known: the node source is empty")
        return nodes

    def _deadline(self, timeout: float | None) -> float:
        """The loop time a call given this timeout is due by."""
        seconds = self._timeout if timeout is None else _positive("timeout", timeout)
        return asyncio.get_running_loop().time() + seconds

    def _bound_ring(self) -> HashRing:
        """The ring, after binding the client to the running loop on first use."""
        if self._binding.closed:
            raise RuntimeError("the client is closed")
        loop = asyncio.get_running_loop()
        if self._binding.loop is None:
            self._binding.loop = loop
            # Listen first, then read: a change in between comes after, and the
            # listener applies every set in order, on this loop.
            self._source.on_change(self._changed)
            self._apply(frozenset(self._source.addresses))
        elif loop is not self._binding.loop:
            raise RuntimeError("a Client serves the event loop it was first used in; make one per loop")
        return self._ring

    def _changed(self, addresses: Collection[str]) -> None:
        """The source's listener, on any thread: apply the change on the client's loop."""
        if not self._binding.closed and self._binding.loop is not None:
            self._binding.loop.call_soon_threadsafe(self._apply, frozenset(addresses))

    def _apply(self, addresses: frozenset[str]) -> None:
        if self._binding.closed:
            return
        for node in self._ring.nodes - addresses:
            self._ring.remove(node)
            if entry := self._channels.pop(node, None):
                # Calls in flight get the default timeout to finish.
                task = asyncio.create_task(entry[0].close(grace=self._timeout))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        for node in addresses - self._ring.nodes:
            self._ring.add(node)


class Watch:
    """Client.watch's stream: one Watch call per node known on entering, merged.

    Entering opens the streams at once and returns when every node has set up
    its watch (retrying UNAVAILABLE as any call does, within `timeout`), so
    every change made after that is delivered. Events of one node come in its
    revision order; nodes interleave. Nodes that join later are not watched.
    The first failure of any stream ends the iteration with its error:
    OUT_OF_RANGE (FluxKVError) when a node no longer holds the revision to
    start from or the watcher fell behind (Scan again and watch from Info's
    revision + 1 of that node), Unavailable when a node shuts down (watch
    again, from the revision after each node's last event). Leaving the block
    cancels every stream.
    """

    def __init__(self, client: Client, prefix: str, start: int | Mapping[str, int], timeout: float | None) -> None:
        self._client = client
        self._prefix = prefix
        self._start = start
        self._timeout = timeout
        self._queue: asyncio.Queue[list[WatchEvent] | FluxKVError | None] = asyncio.Queue(_WATCH_BUFFER)
        self._calls: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._open = 0  # streams not ended
        self._pending: deque[WatchEvent] = deque()

    async def __aenter__(self) -> Self:
        client = self._client
        nodes = client._members()
        deadline = client._deadline(self._timeout)
        try:
            calls = await _all(client._retrying(partial(self._open_stream, node, deadline), deadline) for node in nodes)
        except BaseException:
            self._stop()
            raise
        self._tasks = [asyncio.create_task(self._pump(node, call)) for node, call in zip(nodes, calls, strict=True)]
        self._open = len(nodes)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> WatchEvent:
        if not self._pending:
            self._pending.extend(await self._next_batch())
            if not self._pending:
                raise StopAsyncIteration
        return self._pending.popleft()

    async def _next_batch(self) -> list[WatchEvent]:
        """The events of the next message from any node; [] when every stream has ended."""
        while self._open:
            item = await self._queue.get()
            if isinstance(item, FluxKVError):
                self._stop()
                raise item
            if item is None:
                self._open -= 1
            elif item:
                return item
        return []

    async def _open_stream(self, node: str, deadline: float) -> Any:
        start = self._start if isinstance(self._start, int) else self._start.get(node, 0)
        call = self._client._stub(node).Watch(
            pb.WatchRequest(prefix=self._prefix, start_revision=start), metadata=self._client._auth
        )
        self._calls.append(call)
        try:
            await asyncio.wait_for(call.initial_metadata(), deadline - asyncio.get_running_loop().time())
        except TimeoutError:
            call.cancel()
            raise DeadlineExceeded(
                grpc.StatusCode.DEADLINE_EXCEEDED, "the watch was not set up in time", node
            ) from None
        # A refused watch ends with its headers: its status is known by now.
        if call.done() and (code := await call.code()) != grpc.StatusCode.OK:
            raise _status_error(code, await call.details(), await call.trailing_metadata(), node)
        return call

    async def _pump(self, node: str, call: Any) -> None:
        try:
            async for response in call:
                await self._queue.put(
                    [
                        WatchEvent(node, e.revision, _OPS[e.op], e.key, e.value, e.expires_at_ms, e.ts_ms)
                        for e in response.events
                    ]
                )
        except grpc.aio.AioRpcError as exc:
            await self._queue.put(_error(exc, node))
        else:
            await self._queue.put(None)

    def _stop(self) -> None:
        self._open = 0
        for call in self._calls:
            call.cancel()
        for task in self._tasks:
            task.cancel()


# -- the blocking twin --------------------------------------------------------------


class SyncClient:
    """A FluxKV cluster, from blocking code: Client's methods, run on a private
    event loop in a daemon thread. Safe to share between threads; close it, or
    use `with SyncClient(...) as client:`. The arguments are Client's."""

    def __init__(
        self,
        nodes: str | Iterable[str] | NodeSource,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: Retry = Retry(),
        vnodes: int = DEFAULT_VNODES,
        max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        tracer_provider: trace.TracerProvider | None = None,
        tls: TLS | None = None,
        token: str | None = None,
    ) -> None:
        self._client = Client(
            nodes,
            timeout=timeout,
            retry=retry,
            vnodes=vnodes,
            max_batch_items=max_batch_items,
            max_batch_bytes=max_batch_bytes,
            tracer_provider=tracer_provider,
            tls=tls,
            token=token,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fluxkv-client", daemon=True)
        self._thread.start()

        self._etcd_nodes: EtcdNodes | None = None

    @classmethod
    def from_etcd(
        cls,
        endpoints: Sequence[str],
        *,
        prefix: str = DEFAULT_PREFIX,
        etcd_timeout: float = 5.0,
        etcd_tls: TLS | None = None,
        etcd_username: str = "",
        etcd_password: str = "",
        **options: Any,
    ) -> SyncClient:
        """A SyncClient that follows the nodes registered in etcd under `prefix`
        (EtcdError if etcd cannot be reached); `etcd_tls`, `etcd_username` and
        `etcd_password` are EtcdNodes' `tls`, `username` and `password`, and
        `options` are Client's (its `tls` is for the nodes)."""
        nodes = EtcdNodes(endpoints, prefix, etcd_timeout, tls=etcd_tls, username=etcd_username, password=etcd_password)
        client = cls(nodes, **options)
        try:
            client._run(nodes.__aenter__)
        except BaseException:
            client.close()
            raise
        client._etcd_nodes = nodes
        return client

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close every channel and stop the private loop. Closing again does nothing."""
        if self._loop.is_closed():
            return
        try:
            if self._etcd_nodes is not None:
                self._run(self._etcd_nodes.__aexit__, None, None, None)
            self._run(self._client.close)
            self._run(self._loop.shutdown_asyncgens)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def get(self, key: str, *, timeout: float | None = None) -> KeyValue | None:
        """See Client.get."""
        return self._run(self._client.get, key, timeout=timeout)

    def set(
        self,
        key: str,
        value: bytes,
        ttl_ms: int = 0,
        expect_revision: int | None = None,
        *,
        timeout: float | None = None,
    ) -> int:
        """See Client.set."""
        return self._run(self._client.set, key, value, ttl_ms, expect_revision, timeout=timeout)

    def delete(self, key: str, expect_revision: int | None = None, *, timeout: float | None = None) -> Deleted:
        """See Client.delete."""
        return self._run(self._client.delete, key, expect_revision, timeout=timeout)

    def multi_get(self, keys: Iterable[str], *, timeout: float | None = None) -> list[KeyValue | None]:
        """See Client.multi_get."""
        return self._run(self._client.multi_get, keys, timeout=timeout)

    def multi_set(
        self, items: Mapping[str, bytes] | Iterable[tuple[str, bytes] | SetItem], *, timeout: float | None = None
    ) -> list[SetResult]:
        """See Client.multi_set."""
        return self._run(self._client.multi_set, items, timeout=timeout)

    def scan(
        self, prefix: str = "", *, include_values: bool = True, page_size: int = 100, timeout: float | None = None
    ) -> Iterator[KeyValue]:
        """See Client.scan."""
        pages = self._client._scan_pages(prefix, include_values, page_size, timeout)
        try:
            while True:
                try:
                    page = self._run(pages.__anext__)
                except StopAsyncIteration:
                    return
                yield from page
        finally:
            if not self._loop.is_closed():
                self._run(pages.aclose)

    def watch(
        self, prefix: str = "", start_revision: int | Mapping[str, int] = 0, *, timeout: float | None = None
    ) -> SyncWatch:
        """See Client.watch: `with client.watch(prefix) as events: for event in events: ...`."""
        return SyncWatch(self, self._client.watch(prefix, start_revision, timeout=timeout))

    def _run(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Await `fn(*args, **kwargs)` on the private loop and return its outcome."""
        if self._loop.is_closed():
            raise RuntimeError("the client is closed")

        async def call() -> T:
            return await fn(*args, **kwargs)

        future = asyncio.run_coroutine_threadsafe(call(), self._loop)
        try:
            return future.result()
        except BaseException:  # a KeyboardInterrupt here: stop the call too
            future.cancel()
            raise


class SyncWatch:
    """SyncClient.watch's stream: Watch, run on the client's private loop."""

    def __init__(self, client: SyncClient, watch: Watch) -> None:
        self._run = client._run
        self._watch = watch

    def __enter__(self) -> Self:
        self._run(self._watch.__aenter__)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._run(self._watch.__aexit__, exc_type, exc, tb)

    def __iter__(self) -> Iterator[WatchEvent]:
        while batch := self._run(self._watch._next_batch):
            yield from batch


# -- helpers ----------------------------------------------------------------------


def _scan_cursor(node: str, node_cursor: str) -> str:
    return base64.urlsafe_b64encode(f"{node}\n{node_cursor}".encode()).decode("ascii")


def _parse_scan_cursor(cursor: str) -> tuple[str, str]:
    try:
        node, newline, node_cursor = base64.urlsafe_b64decode(cursor.encode("ascii")).decode().partition("\n")
    except (ValueError, UnicodeError):
        newline = ""
    if not newline or not node:
        shown = cursor if len(cursor) <= 64 else cursor[:64] + "..."
        raise InvalidRequest(grpc.StatusCode.INVALID_ARGUMENT, f"not a scan cursor: {shown!r}")
    return node, node_cursor


async def _all(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run them at once; if one raises, cancel the others and raise that."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise


def _positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be above 0, got {value}")
    return value
