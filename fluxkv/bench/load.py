"""fluxkv-bench's load: the key space and its routing, pre-serialized requests,
the connections of either engine, the probe and the preload, and the closed- and
open-loop drivers.

The load loop is meant to cost the client as little as possible: every request
body is serialized once per key before the run (a multi-key body is the
concatenation of single-item bodies, which protobuf's wire format makes a valid
message), and each key's owner on the ring is looked up once, before the run.
The default engine, "lean" (fluxkv.bench.h2_engine), sends the calls on HTTP/2
connections of its own and checks every answer (status from the trailers, the
message parsed); "grpcio", the reference, sends them through raw grpc.aio
multicallables that send bytes and do not parse the answer (its status says
whether it succeeded).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol, TypeVar

import grpc
import uvloop
from google.protobuf.message import Message

from fluxkv.bench import h2_engine as bench_h2
from fluxkv.bench.h2_engine import Failure
from fluxkv.bench.histogram import Histogram
from fluxkv.cluster.hash_ring import HashRing
from fluxkv.proto import etcd_api_pb2, kv_pb2
from fluxkv.security.tls import TLS, aio_channel

CONNECT_TIMEOUT_S = 3.0
PRELOAD_IN_FLIGHT = 16
PRELOAD_BATCH_BYTES = 4 * 1024 * 1024  # half the node's default FLUX_MAX_BATCH_BYTES
PRELOAD_BATCH_ITEMS = 1000  # the node's default FLUX_MAX_BATCH_ITEMS
# Distinct connections per channel (equal channels share one otherwise); answers may pass grpcio's 4 MiB default.
CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]

ENGINES = ("lean", "grpcio")
# The event loop a client process runs on, by engine (None: asyncio's): the lean engine's calls cost as much CPU
# on uvloop's on a quiet machine and 10-15% less on a busy one (bench/README.md); grpcio's client stays on
# asyncio's, as the reference always ran.
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop] | None] = {"lean": uvloop.new_event_loop, "grpcio": None}
WORKLOADS = ("set", "get", "mixed", "mset", "mget")
BATCH_WORKLOADS = ("mset", "mget")
PRELOADED_WORKLOADS = ("get", "mixed", "mget")

_KV = kv_pb2.DESCRIPTOR.services_by_name["KV"]
_ETCD_KV = etcd_api_pb2.DESCRIPTOR.services_by_name["KV"]


class Rpc(NamedTuple):
    """A unary method the load calls: its path, its response's class, and the body of one key (key, value -> bytes)."""

    path: str
    response: type[Message]
    encode: Callable[[str, bytes], bytes]


def _path(service: Any, method: str) -> str:
    return f"/{service.full_name}/{service.methods_by_name[method].name}"


# (target, kind) -> the method
_REQUESTS: dict[tuple[str, str], Rpc] = {
    ("fluxkv", "set"): Rpc(
        _path(_KV, "Set"), kv_pb2.SetResponse, lambda k, v: kv_pb2.SetRequest(key=k, value=v).SerializeToString()
    ),
    ("fluxkv", "get"): Rpc(
        _path(_KV, "Get"), kv_pb2.GetResponse, lambda k, v: kv_pb2.GetRequest(key=k).SerializeToString()
    ),
    ("fluxkv", "mset"): Rpc(
        _path(_KV, "MultiSet"),
        kv_pb2.MultiSetResponse,
        lambda k, v: kv_pb2.MultiSetRequest(items=[kv_pb2.SetRequest(key=k, value=v)]).SerializeToString(),
    ),
    ("fluxkv", "mget"): Rpc(
        _path(_KV, "MultiGet"),
        kv_pb2.MultiGetResponse,
        lambda k, v: kv_pb2.MultiGetRequest(keys=[k]).SerializeToString(),
    ),
    ("etcd", "set"): Rpc(
        _path(_ETCD_KV, "Put"),
        etcd_api_pb2.PutResponse,
        lambda k, v: etcd_api_pb2.PutRequest(key=k.encode(), value=v).SerializeToString(),
    ),
    ("etcd", "get"): Rpc(
        _path(_ETCD_KV, "Range"),
        etcd_api_pb2.RangeResponse,
        lambda k, v: etcd_api_pb2.RangeRequest(key=k.encode()).SerializeToString(),
    ),
}

Call = Callable[[bytes], Awaitable[Failure | None]]  # call(body): None on success, else how it failed
Send = Callable[[int], Awaitable[str | None]]  # send(slot): None on success, else the status code's name


class SetupError(Exception):
    """The load cannot start: a node or etcd cannot be reached, or the preload failed."""


@dataclass(frozen=True)
class Plan:
    """What one client process sends; picklable, for --processes."""

    target: str  # "fluxkv" or "etcd"
    engine: str  # one of ENGINES
    workload: str
    nodes: tuple[str, ...]
    keyspace: int
    value_size: int
    batch: int  # items per mset/mget call; 1 otherwise
    read_ratio: float
    seed: int
    vnodes: int
    conns: int
    concurrency: int
    requests: int | None  # None: run for duration_s
    duration_s: float | None
    rate: float | None  # requests per second (open loop); None: closed loop
    warmup: int
    timeout_s: float
    tls: TLS | None = None  # None: plaintext
    token: str = ""  # sent as `authorization: Bearer <token>` when set

    def share(self, index: int, processes: int) -> Plan:
        """This plan's part for client process `index` of `processes`: in-flight
        requests, requests, warmup and rate divided, and its own seed."""

        def part(total: int) -> int:
            return total // processes + (index < total % processes)

        return replace(
            self,
            concurrency=part(self.concurrency),
            requests=None if self.requests is None else part(self.requests),
            warmup=part(self.warmup),
            rate=None if self.rate is None else self.rate / processes,
            seed=self.seed + index,
        )


T = TypeVar("T")


def run_on_loop(plan: Plan, main: Coroutine[Any, Any, T]) -> T:
    """asyncio.run(main) on the event loop of the plan's engine (LOOPS)."""
    with asyncio.Runner(loop_factory=LOOPS[plan.engine]) as runner:
        return runner.run(main)


def key_name(i: int) -> str:
    return f"key:{i:012d}"


class KeySpace:
    """Each key's owner (an index into plan.nodes) on the ring, and each node's keys."""

    def __init__(self, plan: Plan) -> None:
        self.size = plan.keyspace
        self.owner: list[int] | None = None
        self.of_node: list[Sequence[int]] = [range(plan.keyspace)]
        if len(plan.nodes) > 1:
            ring = HashRing(plan.nodes, plan.vnodes)
            index = {node: i for i, node in enumerate(plan.nodes)}
            self.owner = [index[ring.owner(key_name(k))] for k in range(plan.keyspace)]
            of_node: list[list[int]] = [[] for _ in plan.nodes]
            for k, node in enumerate(self.owner):
                of_node[node].append(k)
            self.of_node = list(of_node)


def the_value(plan: Plan) -> bytes:
    """The value every write sends: value_size seeded random bytes."""
    return random.Random(plan.seed).randbytes(plan.value_size)


def bodies(plan: Plan, kind: str) -> tuple[Rpc, list[bytes]]:
    """The method of `kind` and its request body for every key."""
    rpc = _REQUESTS[plan.target, kind]
    value = the_value(plan)
    return rpc, [rpc.encode(key_name(k), value) for k in range(plan.keyspace)]


class Connections(Protocol):
    """Channels (each its own connection) to each node."""

    nodes: list[str]

    def calls(self, rpc: Rpc, timeout_s: float) -> list[list[Call]]:
        """calls[node][channel]: `rpc` on that channel, with that deadline."""
        ...

    async def close(self) -> None: ...


class LeanConnections:
    """`conns` fluxkv.bench.h2_engine channels to each node."""

    def __init__(self, nodes: Sequence[str], conns: int, tls: TLS | None, metadata: Sequence[tuple[str, str]]) -> None:
        self.nodes = list(nodes)
        self._channels = [
            [
                bench_h2.Channel(n, CONNECT_TIMEOUT_S, None if tls is None else tls.ssl_context(), metadata)
                for _ in range(conns)
            ]
            for n in nodes
        ]

    def calls(self, rpc: Rpc, timeout_s: float) -> list[list[Call]]:
        return [[ch.method(rpc.path, rpc.response, timeout_s) for ch in row] for row in self._channels]

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for row in self._channels for ch in row))


class GrpcioConnections:
    """`conns` grpc.aio channels to each node, whose raw multicallables send bytes and do not parse the answer."""

    def __init__(self, nodes: Sequence[str], conns: int, tls: TLS | None, metadata: Sequence[tuple[str, str]]) -> None:
        self.nodes = list(nodes)
        self._metadata = tuple(metadata) or None
        credentials = None if tls is None else tls.channel_credentials()
        self._channels = [[aio_channel(n, credentials, CHANNEL_OPTIONS) for _ in range(conns)] for n in nodes]

    def calls(self, rpc: Rpc, timeout_s: float) -> list[list[Call]]:
        metadata = self._metadata

        def checked(multicallable: Any) -> Call:
            async def call(body: bytes) -> Failure | None:
                try:
                    await multicallable(body, timeout=timeout_s, metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    return Failure(str(exc.code().name), exc.details() or "")
                return None

            return call

        return [[checked(ch.unary_unary(rpc.path, _registered_method=True)) for ch in row] for row in self._channels]

    async def close(self) -> None:
        await asyncio.gather(*(ch.close() for row in self._channels for ch in row))


def connections(plan: Plan, conns: int) -> Connections:
    """`conns` channels to each of the plan's nodes, by its engine."""
    kind = GrpcioConnections if plan.engine == "grpcio" else LeanConnections
    metadata = [("authorization", f"Bearer {plan.token}")] if plan.token else []
    return kind(plan.nodes, conns, plan.tls, metadata)


async def probe(conns: Connections, rpc: Rpc, body: bytes) -> None:
    """One call on every channel, so that each is connected; SetupError if one fails."""

    async def one(node: int, call: Call) -> None:
        failure = await call(body)
        if failure is None:
            return
        address = conns.nodes[node]
        if failure.code == "UNAVAILABLE":
            # grpcio: "...: Failed to connect to remote host: Connection refused" -> "Connection refused"
            reason = failure.message.rsplit(": ", 1)[-1].strip(" ]") or "unavailable"
            raise SetupError(f"cannot reach {address} ({reason})")
        if failure.code == "DEADLINE_EXCEEDED":
            raise SetupError(f"cannot reach {address} (no answer within {CONNECT_TIMEOUT_S:g} s)")
        raise SetupError(f"{address} refused {rpc.path} ({failure.code}: {failure.message})")

    calls = conns.calls(rpc, CONNECT_TIMEOUT_S)
    await asyncio.gather(*(one(n, call) for n, row in enumerate(calls) for call in row))


def probe_request(plan: Plan) -> tuple[Rpc, bytes]:
    """A call of the workload's own method (a read for mixed) on the first key:
    it writes nothing the load would not write, and a server that answers it
    (a no-op reference that serves only Set, say) can take the load."""
    rpc = _REQUESTS[plan.target, "get" if plan.workload == "mixed" else plan.workload]
    return rpc, rpc.encode(key_name(0), the_value(plan))


async def preload(plan: Plan, keys: KeySpace, conns: Connections) -> int:
    """Write every key once: MultiSet batches to each key's owner (etcd: one Put
    per key), PRELOAD_IN_FLIGHT calls at a time. Returns the number of calls."""
    jobs: list[tuple[Call, bytes]] = []
    if plan.target == "etcd":
        rpc, puts = bodies(plan, "set")
        call = conns.calls(rpc, plan.timeout_s)[0][0]
        jobs = [(call, body) for body in puts]
    else:
        rpc, items = bodies(plan, "mset")
        calls = conns.calls(rpc, plan.timeout_s)
        per_call = max(1, min(PRELOAD_BATCH_ITEMS, PRELOAD_BATCH_BYTES // (len(items[0]) if items else 1)))
        for node, owned in enumerate(keys.of_node):
            for start in range(0, len(owned), per_call):
                chunk = owned[start : start + per_call]
                jobs.append((calls[node][0], b"".join(items[k] for k in chunk)))
    pending = iter(jobs)

    async def worker() -> None:
        for call, body in pending:
            failure = await call(body)
            if failure is not None:
                raise SetupError(f"preload failed: {failure.code}: {failure.message}")

    await asyncio.gather(*(worker() for _ in range(PRELOAD_IN_FLIGHT)))
    return len(jobs)


def sender(plan: Plan, keys: KeySpace, conns: Connections, rng: random.Random) -> Send:
    """send(slot): one request of the workload, on channel `slot` % conns of the
    owner of its (first) key; keys are drawn uniformly from the key space. A
    batch's other keys are drawn from the same node's keys, so each call goes
    to one node, as the SDK sends each owner its part."""
    draw, size, owner = rng.random, keys.size, keys.owner

    def table(kind: str) -> tuple[list[list[Call]], list[bytes]]:
        rpc, body = bodies(plan, kind)
        return conns.calls(rpc, plan.timeout_s), body

    def pick() -> tuple[int, int]:
        k = int(draw() * size)
        return k, owner[k] if owner is not None else 0

    if plan.workload in BATCH_WORKLOADS:
        calls, items = table(plan.workload)
        extra, of_node = range(plan.batch - 1), keys.of_node

        async def send_batch(slot: int) -> str | None:
            k, node = pick()
            pool = of_node[node]
            n = len(pool)
            body = items[k] + b"".join([items[pool[int(draw() * n)]] for _ in extra])
            row = calls[node]
            failure = await row[slot % len(row)](body)
            return None if failure is None else failure.code

        return send_batch
    if plan.workload == "mixed":
        reads, writes, ratio = table("get"), table("set"), plan.read_ratio

        async def send_mixed(slot: int) -> str | None:
            calls, body = reads if draw() < ratio else writes
            k, node = pick()
            row = calls[node]
            failure = await row[slot % len(row)](body[k])
            return None if failure is None else failure.code

        return send_mixed
    calls, body = table(plan.workload)

    async def send_one(slot: int) -> str | None:
        k, node = pick()
        row = calls[node]
        failure = await row[slot % len(row)](body[k])
        return None if failure is None else failure.code

    return send_one


class Tally:
    """The outcome of the requests so far: successes' latencies, failures by status code."""

    def __init__(self) -> None:
        self.hist = Histogram()
        self.failures: dict[str, int] = {}
        self.done = 0

    def failed(self) -> int:
        return sum(self.failures.values())


class Clock(Protocol):
    """Time in integer nanoseconds, and a way to wait for a moment; tests pass a fake one."""

    def now(self) -> int: ...

    async def sleep_until(self, t: int) -> None: ...


class RealClock:
    def now(self) -> int:
        return time.monotonic_ns()

    async def sleep_until(self, t: int) -> None:
        # uvloop's timers count whole milliseconds from a time cached per loop
        # turn, so a sleep can end up to a millisecond early: sleep again for
        # what is left, so that no request goes out before it is due.
        while (delay := (t - time.monotonic_ns()) / 1e9) > 0:
            await asyncio.sleep(delay)


async def drive(
    send: Send,
    slots: int,
    tally: Tally,
    clock: Clock,
    *,
    limit: int | None = None,
    duration_s: float | None = None,
    rate: float | None = None,
) -> None:
    """Send requests with at most `slots` in flight, until `limit` have been sent
    or `duration_s` has passed.

    Closed loop (`rate` None): a slot sends its next request when its last one
    ends, and a latency runs from the send. Open loop: request i is due at
    start + i / rate and a free slot sends it then, or at once if it is late (all
    slots were busy: the system stalled); its latency runs from the due time, so
    a stall counts for every request that should have been sent during it, not
    for one (no coordinated omission)."""
    start = clock.now()
    until = None if duration_s is None else start + int(duration_s * 1e9)
    interval = None if rate is None else 1e9 / rate
    issued = 0
    hist, failures = tally.hist, tally.failures

    async def slot(index: int) -> None:
        nonlocal issued
        while limit is None or issued < limit:
            due = clock.now() if interval is None else start + int(issued * interval)
            if until is not None and due >= until:
                return
            issued += 1
            if interval is not None:
                await clock.sleep_until(due)
            code = await send(index)
            if code is None:
                hist.record(clock.now() - due)
            else:
                failures[code] = failures.get(code, 0) + 1
            tally.done += 1

    await asyncio.gather(*(slot(i) for i in range(slots)))


@dataclass
class Outcome:
    """One client process's measured phase."""

    hist: Histogram
    failures: dict[str, int]
    duration_s: float
    cpu_s: float

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "hist": self.hist.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Outcome:
        return cls(**{**data, "hist": Histogram.from_dict(data["hist"])})

    def core_share(self) -> float | None:
        """CPU seconds per second of the measured phase: 1.0 is one core busy all along."""
        return self.cpu_s / self.duration_s if self.duration_s > 0 else None


def merge(outcomes: Sequence[Outcome]) -> Outcome:
    """The client processes' outcomes as one: histograms and failures merged, CPU
    times added (duration_s is not theirs to merge: 0)."""
    merged = Outcome(Histogram(), {}, 0.0, 0.0)
    for outcome in outcomes:
        merged.hist.merge(outcome.hist)
        for code, count in outcome.failures.items():
            merged.failures[code] = merged.failures.get(code, 0) + count
        merged.cpu_s += outcome.cpu_s
    return merged


async def until_stopped(work: Awaitable[None], stopped: asyncio.Event) -> bool:
    """Run `work` unless `stopped` is set first (then cancel it); True if it finished."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stopped.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False
    task.result()
    return True


async def run_process(
    plan: Plan, tally: Tally, begin: Callable[[], Awaitable[None]], stopped: asyncio.Event
) -> Outcome:
    """One client process: connect, warm up (unmeasured), `await begin()`, then
    the measured phase into `tally`, until done or `stopped`."""
    keys = KeySpace(plan)
    conns = connections(plan, plan.conns)
    clock = RealClock()
    try:
        await probe(conns, *probe_request(plan))
        send = sender(plan, keys, conns, random.Random(plan.seed))
        warm = drive(send, plan.concurrency, Tally(), clock, limit=plan.warmup)
        if not await until_stopped(warm, stopped):
            return Outcome(tally.hist, tally.failures, 0.0, 0.0)
        await begin()
        cpu0, t0 = time.process_time(), time.monotonic()
        measured = drive(
            send, plan.concurrency, tally, clock, limit=plan.requests, duration_s=plan.duration_s, rate=plan.rate
        )
        await until_stopped(measured, stopped)
        return Outcome(tally.hist, tally.failures, time.monotonic() - t0, time.process_time() - cpu0)
    finally:
        await conns.close()
