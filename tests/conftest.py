"""Shared fixtures: a node in this process, or a real fluxkv-server process, both
on an ephemeral port, and gRPC stubs connected to them; a private etcd or
RabbitMQ node for tests that stop, kill or restart one.

Every test that starts a node runs once on each gRPC server (the `grpc_server`
fixture's parameter): settings() and server_process() refuse to start a node
in a test without it, so that no test talks to one server only.

Markers (pyproject.toml): a test that uses the shared RabbitMQ broker or starts
one is `broker`, one that starts etcd is `etcd`; pytest_collection_modifyitems
marks the tests whose fixtures say so, the others carry the mark themselves.
`pytest -m "not broker and not etcd"` runs what needs neither."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import grpc
import httpx
import pygrpc_native
import pytest
import trustme
from google.rpc import error_details_pb2, status_pb2

from deploy.private_servers import BrokerTLS, EtcdServer, RabbitBroker
from fluxkv import config
from fluxkv.cluster.hash_ring import HashRing
from fluxkv.obs.tracing import Tracing
from fluxkv.proto import compat_kv_pb2_grpc, kv_pb2, kv_pb2_grpc
from fluxkv.security import tokens as token_secrets
from fluxkv.server.node import Node

ROOT = Path(__file__).resolve().parent.parent
HTTP_TIMEOUT_S = 30
READY = re.compile(r"serving on (\S+:\d+)")
START_TIMEOUT_S = 30


# The fixtures that need a broker (the shared one, or one of the test's own) or etcd: etcd_server, and every
# fixture named like it (tls_etcd_server...) that starts an etcd of its own.
BROKER_FIXTURES = {"names", "rabbit_broker", "rabbit_tls_broker", "rabbit_mtls_broker"}
ETCD_FIXTURE_SUFFIX = "etcd_server"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if fixtures & BROKER_FIXTURES:
            item.add_marker(pytest.mark.broker)
        if any(name.endswith(ETCD_FIXTURE_SUFFIX) for name in fixtures):
            item.add_marker(pytest.mark.etcd)


GRPC_SERVERS = ("native", "grpcio")
# The current test's gRPC server, while its grpc_server fixture is set up.
_grpc_server: str | None = None


@pytest.fixture(params=GRPC_SERVERS)
def grpc_server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The gRPC server this test's nodes run on, in this process (settings())
    and in the processes it starts (FLUX_GRPC_SERVER)."""
    global _grpc_server
    monkeypatch.setenv("FLUX_GRPC_SERVER", request.param)
    _grpc_server = request.param
    yield request.param
    _grpc_server = None


def grpc_server_in_use() -> str:
    """The current test's gRPC server; an error in a test without the grpc_server fixture."""
    if _grpc_server is None:
        raise RuntimeError("this test starts a node: give it the grpc_server fixture, so that it runs on both servers")
    return _grpc_server


def server_version(grpc_server: str) -> str:
    """How Info and /metrics name a gRPC server and its version."""
    return {"native": f"pygrpc-native {pygrpc_native.__version__}", "grpcio": f"grpcio {grpc.__version__}"}[grpc_server]


def settings(**overrides: object) -> config.Settings:
    """Test settings: free ports (gRPC and admin), a short grace period, the test's gRPC server."""
    defaults = config.Settings(port=0, admin_port=0, shutdown_grace_s=2.0, grpc_server=grpc_server_in_use())
    return dataclasses.replace(defaults, **overrides)  # type: ignore[arg-type]


@pytest.fixture
async def node(grpc_server: str) -> AsyncIterator[Node]:
    n = Node(settings())
    await n.start()
    yield n
    await n.stop()


@asynccontextmanager
async def running_node(
    tracing: Tracing | None = None, **overrides: object
) -> AsyncIterator[tuple[Node, kv_pb2_grpc.KVStub]]:
    """A node in this process with these settings (and tracing), and a stub connected to it."""
    node = Node(settings(**overrides), tracing)
    await node.start()
    try:
        async with grpc.aio.insecure_channel(node.address) as ch:
            yield node, kv_pb2_grpc.KVStub(ch)
    finally:
        await node.stop()


@asynccontextmanager
async def node_whose_writes_wait(**overrides: object) -> AsyncIterator[tuple[Node, kv_pb2_grpc.KVStub]]:
    """A node in this process whose every write waits in its handler (up to 60 s): its broker
    cannot be reached, and a MultiSet of 1000 keys filled its CDC queue."""
    broker = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    full = {
        "rabbitmq_url": broker,
        "cdc_queue_events": 1000,
        "cdc_block_timeout_ms": 60_000,
        "cdc_flush_timeout_s": 0.1,
    }
    async with running_node(**{**full, **overrides}) as (node, kv):
        await kv.MultiSet(
            kv_pb2.MultiSetRequest(items=[kv_pb2.SetRequest(key=f"k{i}", value=b"v") for i in range(1000)])
        )
        yield node, kv


async def writes_waiting(node: Node, count: int) -> None:
    """Return once `count` writes have waited for room in the node's CDC queue."""
    assert node.cdc is not None
    async with asyncio.timeout(30):  # the node counts a write that waits; nothing announces it
        while node.cdc.counters().writes_delayed < count:
            await asyncio.sleep(0.01)


@pytest.fixture
async def channel(node: Node) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(node.address) as ch:
        yield ch


@pytest.fixture
def kv(channel: grpc.aio.Channel) -> kv_pb2_grpc.KVStub:
    return kv_pb2_grpc.KVStub(channel)


@pytest.fixture
def compat(channel: grpc.aio.Channel) -> compat_kv_pb2_grpc.KVServiceStub:
    return compat_kv_pb2_grpc.KVServiceStub(channel)


def revision_mismatch(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The metadata of the REVISION_MISMATCH ErrorInfo a failed condition carries, read as a
    plain gRPC client does: a google.rpc.Status in the trailing metadata grpc-status-details-bin."""
    [details] = [v for k, v in error.trailing_metadata() or () if k == "grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    assert (status.code, status.message) == (grpc.StatusCode.ABORTED.value[0], error.details())
    [detail] = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert (info.reason, info.domain) == ("REVISION_MISMATCH", "fluxkv")
    return dict(info.metadata)


class Cluster:
    """Nodes in this process, and which of them owns a key."""

    def __init__(self, nodes: list[Node]) -> None:
        self.nodes = nodes
        self.addresses = [n.address for n in nodes]
        self.ring = HashRing(self.addresses)
        self.stopped: set[str] = set()

    def owner(self, key: str) -> Node:
        return self.nodes[self.addresses.index(self.ring.owner(key))]

    def key_on(self, node: Node, prefix: str = "key") -> str:
        """A key that `node` owns."""
        return next(k for k in (f"{prefix}:{i}" for i in range(10_000)) if self.owner(k) is node)

    async def stop(self, node: Node) -> None:
        self.stopped.add(node.address)
        await node.stop()


@asynccontextmanager
async def cluster(count: int, **overrides: object) -> AsyncIterator[Cluster]:
    nodes: list[Node] = []
    c = Cluster(nodes)
    try:
        for _ in range(count):
            node = Node(settings(**overrides))
            await node.start()
            nodes.append(node)
        c = Cluster(nodes)
        yield c
    finally:
        for node in nodes:
            if node.address not in c.stopped:
                await node.stop()


class ServerProcess:
    """A child process of ours (fluxkv-server, fluxkv-gateway); its stderr is collected in
    `lines`, and `address` is where its "serving on" line says it serves."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.address = ""
        self._ready = threading.Event()
        self._new_line = threading.Condition()
        self._ended = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._new_line:
                self.lines.append(line)
                self._new_line.notify_all()
            if not self.address and (m := READY.search(line)):
                self.address = m.group(1)
                self._ready.set()
        with self._new_line:
            self._ended = True
            self._new_line.notify_all()
        self._ready.set()  # exited: wake wait_ready

    def wait_for(self, pattern: str, count: int = 1, timeout: float = START_TIMEOUT_S) -> list[re.Match[str]]:
        """Wait until `count` lines of the log match `pattern`; their matches."""

        def matches() -> list[re.Match[str]]:
            return [m for line in self.lines if (m := re.search(pattern, line))]

        with self._new_line:
            if not self._new_line.wait_for(lambda: len(matches()) >= count or self._ended, timeout):
                raise TimeoutError(f"no {count} lines matching {pattern!r} in {timeout} s:\n{self.log}")
            found = matches()
        if len(found) < count:
            raise RuntimeError(f"{self.proc.args[1]} exited before {count} lines matched {pattern!r}:\n{self.log}")
        return found[:count]

    def wait_ready(self) -> str:
        if not self._ready.wait(START_TIMEOUT_S) or not self.address:
            self.proc.kill()
            raise RuntimeError(f"{self.proc.args[1]} did not start:\n" + "".join(self.lines))
        return self.address

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send `sig`, wait for the exit; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        """Wait for the process to exit; returns the exit status."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self._reader.join(5)
        return code

    @property
    def log(self) -> str:
        return "".join(self.lines)


@contextmanager
def server_process(*args: str, env: Mapping[str, str] | None = None) -> Iterator[ServerProcess]:
    """Start `cmd/fluxkv-server --port 0 ARGS` and wait until it serves. Its admin
    port is a free one (FLUX_ADMIN_PORT=0) unless `env` says otherwise; its
    gRPC server is the test's, unless `env` names one (FLUX_GRPC_SERVER)."""
    if "FLUX_GRPC_SERVER" not in (env or {}):
        grpc_server_in_use()
    with program_process("fluxkv-server", "--port", "0", *args, env={"FLUX_ADMIN_PORT": "0", **(env or {})}) as s:
        yield s


@contextmanager
def program_process(program: str, *args: str, env: Mapping[str, str]) -> Iterator[ServerProcess]:
    """Start `cmd/PROGRAM ARGS` with `env` over this process's environment, wait until it
    logs that it serves, and kill it at the end if it still runs."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cmd" / program), *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **env},
    )
    server = ServerProcess(proc)
    try:
        server.wait_ready()
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture
def server(grpc_server: str) -> Iterator[ServerProcess]:
    with server_process() as s:
        yield s


@pytest.fixture
def etcd_server() -> Iterator[EtcdServer]:
    """A started private etcd, killed and deleted after the test."""
    with EtcdServer() as server:
        yield server


@pytest.fixture
def rabbit_broker() -> Iterator[RabbitBroker]:
    """A started private RabbitMQ node, killed and deleted after the test. The system broker
    (BROKER) is shared by other tests, so a test that stops, kills or restarts a broker gets
    one of its own."""
    with RabbitBroker() as broker:
        yield broker


@pytest.fixture(scope="module")
def rabbit_tls_broker(certificates: Certificates) -> Iterator[RabbitBroker]:
    """A private RabbitMQ node that also serves AMQP over TLS (tls_url) with the session's server
    certificate, asking clients for none; shared by the tests of a module, so none may stop it."""
    with RabbitBroker(tls=BrokerTLS(certificates.ca, certificates.cert, certificates.key)) as broker:
        yield broker


@pytest.fixture(scope="module")
def rabbit_mtls_broker(certificates: Certificates) -> Iterator[RabbitBroker]:
    """The same, but its TLS listener requires a client certificate that the session's CA signed."""
    tls = BrokerTLS(certificates.ca, certificates.cert, certificates.key, require_client_cert=True)
    with RabbitBroker(tls=tls) as broker:
        yield broker


@dataclass(frozen=True)
class Certificates:
    """PEM files made for this test session: a CA, a server certificate it signed
    for localhost, 127.0.0.1 and ::1 (which the nodes also present as clients
    under mutual TLS), a client certificate it signed, and a second CA with a
    client certificate of its own, which the first CA does not vouch for."""

    ca: str
    cert: str
    key: str
    client_cert: str
    client_key: str
    other_ca: str
    other_client_cert: str
    other_client_key: str

    def server_settings(self, mutual: bool = False) -> dict[str, str]:
        """Settings overrides for a node that serves TLS (and asks clients for certificates)."""
        tls = {"tls_cert_file": self.cert, "tls_key_file": self.key, "tls_ca_file": self.ca}
        return {**tls, "tls_client_ca_file": self.ca} if mutual else tls

    def server_environ(self, mutual: bool = False) -> dict[str, str]:
        """The same, as a node process's environment."""
        return {"FLUX_" + field.upper(): path for field, path in self.server_settings(mutual).items()}


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    root = tmp_path_factory.mktemp("tls")
    ca, other_ca = trustme.CA(), trustme.CA()
    files: dict[str, str] = {}

    def write(name: str, blob: trustme.Blob) -> None:
        blob.write_to_path(root / f"{name}.pem")
        files[name] = str(root / f"{name}.pem")

    server = ca.issue_cert("localhost", "127.0.0.1", "::1")
    client = ca.issue_cert("client.fluxkv.test")
    other_client = other_ca.issue_cert("client.other.test")
    write("ca", ca.cert_pem)
    write("other_ca", other_ca.cert_pem)
    for name, leaf in (("", server), ("client_", client), ("other_client_", other_client)):
        (root / f"{name}cert.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        files[f"{name}cert"] = str(root / f"{name}cert.pem")
        write(f"{name}key", leaf.private_key_pem)
    return Certificates(**files)


# -- tokens (FLUX_AUTH_TOKENS_FILE) -----------------------------------------------


def write_tokens(path: Path, tables: Mapping[str, tuple[str, Sequence[str]]]) -> dict[str, str]:
    """Write a tokens file with a fresh token per name ({name: (role, prefixes)}, no prefixes: every
    key), as `fluxkv token new` makes them; return each name's secret."""
    secrets = {name: token_secrets.new_secret() for name in tables}
    path.write_text(
        "\n".join(
            token_secrets.toml_table(name, secrets[name], token_secrets.ROLES[role], prefixes)
            for name, (role, prefixes) in tables.items()
        )
    )
    return secrets


def bearer(secret: str) -> tuple[tuple[str, str]]:
    """The metadata that sends a token."""
    return (("authorization", f"Bearer {secret}"),)


BROKER = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass
class Names:
    exchange: str
    queue: str


@pytest.fixture
async def names() -> AsyncIterator[Names]:
    """An exchange and a queue of this test's own on the shared broker."""
    tag = uuid.uuid4().hex[:12]
    n = Names(f"fluxkv-test-{tag}", f"fluxkv-test-{tag}")
    yield n
    connection = await aio_pika.connect(BROKER)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(n.queue)
        await channel.exchange_delete(n.exchange)


# -- the admin port ------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


async def http_get(
    port: int, target: str, headers: Mapping[str, str] | None = None, tls: ssl.SSLContext | None = None
) -> Answer:
    """GET `target` on 127.0.0.1:`port` with httpx (HTTPS, checked with `tls`, if given)."""
    url = f"{'https' if tls is not None else 'http'}://127.0.0.1:{port}{target}"
    # verify=False for plain HTTP only: there is no certificate to check (and no CA bundle to load).
    async with httpx.AsyncClient(verify=tls if tls is not None else False, timeout=HTTP_TIMEOUT_S) as client:
        answer = await client.get(url, headers=headers)
    return Answer(answer.status_code, dict(answer.headers), answer.content)


async def http_raw(port: int, request: bytes) -> Answer:
    """Send `request` bytes as they are (for requests an HTTP client would not send) and read one answer."""
    async with asyncio.timeout(HTTP_TIMEOUT_S):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status_line, *header_lines = head.rstrip("\r\n").split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
            head_only = request.startswith(b"HEAD ")  # its answer says the length of a body it does not send
            body = b"" if head_only else await reader.readexactly(int(headers["content-length"]))
        finally:
            writer.close()
    assert status_line.startswith("HTTP/1.1 "), head
    return Answer(int(status_line.split()[1]), headers, body)


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def listening_ports(pid: int) -> set[int]:
    """TCP ports process `pid` listens on (Linux: its socket fds matched against /proc/net/tcp*)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def eventually(condition: Callable[[], object], what: str, wait_s: float = 20.0) -> None:
    """Poll a condition that no event announces to the test (etcd state, a
    lease expiring, a file another process writes), every 50 ms, for at most
    wait_s seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {wait_s} s: {what}")
        await asyncio.sleep(0.05)
