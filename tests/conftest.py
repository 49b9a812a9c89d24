"""Shared fixtures: a node in this process, or a real fluxkv-server process, both
on an ephemeral port, and gRPC stubs connected to them; a private etcd or
RabbitMQ node for tests that stop, kill or restart one."""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import grpc
import pytest

from fluxkv import config
from fluxkv.private_servers import EtcdServer, RabbitBroker
from fluxkv.proto import compat_kv_pb2_grpc, kv_pb2_grpc
from fluxkv.server import Node

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"serving on (\S+:\d+)")
START_TIMEOUT_S = 30


def settings(**overrides: object) -> config.Settings:
    return dataclasses.replace(config.Settings(port=0, shutdown_grace_s=2.0), **overrides)  # type: ignore[arg-type]


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    n = Node(settings())
    await n.start()
    yield n
    await n.stop()


@asynccontextmanager
async def running_node(**overrides: object) -> AsyncIterator[tuple[Node, kv_pb2_grpc.KVStub]]:
    """A node in this process with these settings, and a stub connected to it."""
    node = Node(settings(**overrides))
    await node.start()
    try:
        async with grpc.aio.insecure_channel(node.address) as ch:
            yield node, kv_pb2_grpc.KVStub(ch)
    finally:
        await node.stop()


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


class ServerProcess:
    """A fluxkv-server child process; its stderr is collected in `lines`."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.address = ""
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if not self.address and (m := READY.search(line)):
                self.address = m.group(1)
                self._ready.set()
        self._ready.set()  # exited: wake wait_ready

    def wait_ready(self) -> str:
        if not self._ready.wait(START_TIMEOUT_S) or not self.address:
            self.proc.kill()
            raise RuntimeError("fluxkv-server did not start:\n" + "".join(self.lines))
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
    """Start `cmd/fluxkv-server --port 0 ARGS` and wait until it serves."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cmd" / "fluxkv-server"), "--port", "0", *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **(env or {})},
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
def server() -> Iterator[ServerProcess]:
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
