"""deploy/native_stack.py: the stack of deploy/docker-compose.yml on this machine without Docker (Debian's etcd and
RabbitMQ, this checkout's programs), used through the SDK and the gateway's HTTP API as an application would, then
stopped without leaving a process behind."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from deploy import native_stack
from fluxkv import Client, EtcdNodes, config
from fluxkv.cluster.etcd_client import EtcdClient
from fluxkv.proto import kv_pb2, kv_pb2_grpc
from tests.conftest import ROOT, eventually

NATIVE_STACK = ROOT / "deploy" / "native_stack.py"
ENV_FILE = ROOT / "deploy" / ".env.example"
NODES = ("fluxkv-1", "fluxkv-2", "fluxkv-3")
GATEWAY = "fluxkv-gateway"
GATEWAY_PORT = 8080  # in the compose file
MARK = "FLUXKV_TEST_STACK"  # in the environment of every process the stack starts, and of no other
UP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 120.0
WAIT_S = 30.0


class RunningStack:
    def __init__(self, proc: asyncio.subprocess.Process, directory: Path, stderr: Path, mark: str) -> None:
        self.proc = proc
        self.dir = directory
        self.stderr = stderr
        self.mark = mark
        self.output = ""  # its stdout so far

    @property
    def services(self) -> dict[str, Any]:
        services: dict[str, Any] = json.loads((self.dir / "stack.json").read_text())["services"]
        return services

    def address(self, service: str, container_port: int) -> str:
        return f"127.0.0.1:{self.services[service]['ports'][str(container_port)]}"

    async def wait_up(self) -> None:
        """Wait for the line that says the stack is up (AssertionError if it exits or takes too long)."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + UP_TIMEOUT_S
        while "the stack is up" not in self.output:
            try:
                line = await asyncio.wait_for(self.proc.stdout.readline(), deadline - time.monotonic())
            except TimeoutError:
                raise AssertionError(f"the stack was not up within {UP_TIMEOUT_S} s:\n{self.log}") from None
            if not line:
                await self.proc.wait()
                raise AssertionError(f"the stack exited with {self.proc.returncode}:\n{self.log}")
            self.output += line.decode()

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)

    @property
    def log(self) -> str:
        return self.output + self.stderr.read_text()


@asynccontextmanager
async def native(tmp_path: Path, *args: str) -> AsyncIterator[RunningStack]:
    """`native_stack.py up --dir tmp_path/stack ARGS`; killed (with what it started) if still running at the end."""
    mark = uuid.uuid4().hex
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(NATIVE_STACK),
            "up",
            "--dir",
            str(tmp_path / "stack"),
            "--env-file",
            str(ENV_FILE),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
            env={**os.environ, MARK: mark},
        )
    stack = RunningStack(proc, tmp_path / "stack", stderr, mark)
    try:
        yield stack
    finally:  # after a failure; else the test has stopped it and checks that nothing is left
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for pid in processes_marked(mark):
            os.kill(pid, signal.SIGKILL)


def processes_marked(mark: str) -> list[int]:
    """The processes whose environment has MARK=mark: those the stack started, and any they started."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"{MARK}={mark}".encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone meanwhile
            pass
    return found


def events(path: Path) -> list[dict[str, Any]]:
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines()]


def logged_at(log: Path, event: str) -> str:
    """The time of the first JSON log line of `log` with this event (ISO 8601, UTC: ordered as strings)."""
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    return next(line["ts"] for line in lines if line.get("event") == event)


@pytest.mark.broker
@pytest.mark.etcd
@pytest.mark.timeout(UP_TIMEOUT_S + 2 * STOP_TIMEOUT_S)
async def test_the_stack_serves_the_sdk_and_http_registers_its_nodes_captures_changes_and_stops_clean(
    tmp_path: Path, grpc_server: str
) -> None:
    async with native(tmp_path) as stack:
        await stack.wait_up()
        services = stack.services
        etcd = stack.address("etcd", 2379)
        compose = native_stack.load_compose(
            ROOT / "deploy" / "docker-compose.yml", native_stack.read_env_file(ENV_FILE)
        )
        nodes = {stack.address(n, int(compose["services"][n]["environment"]["FLUX_SERVER_PORT"])) for n in NODES}
        assert "jaeger" in stack.output and "tracing is off" in stack.output

        async with EtcdClient([etcd], 5.0) as client:

            async def all_registered() -> bool:
                pairs, _ = await client.get_prefix(config.Settings.etcd_prefix)
                return {address for _, address in pairs} == nodes

            await eventually(all_registered, "all three nodes register in etcd", wait_s=WAIT_S)

        for address in nodes:  # the shell's FLUX_GRPC_SERVER reaches the compose file's nodes
            async with grpc.aio.insecure_channel(address) as channel:
                info = await kv_pb2_grpc.KVStub(channel).Info(kv_pb2.InfoRequest(), timeout=10)
            assert {s.name: s.state for s in info.subsystems}["grpc"] == grpc_server

        key, value = f"stack:{uuid.uuid4().hex[:8]}", b"written through the SDK"
        async with EtcdNodes([etcd]) as source, Client(source, timeout=10) as sdk:
            await sdk.set(key, value)
            item = await sdk.get(key)
            assert item is not None and item.value == value

        # The gateway: Flux-KV's HTTP API over the same nodes, which it finds in etcd.
        url = services[GATEWAY]["url"]
        assert url == f"http://{stack.address(GATEWAY, GATEWAY_PORT)}/" and url in stack.output
        http_key, http_value = f"{key}:http", "written through the gateway"
        async with httpx.AsyncClient(base_url=url, timeout=10, trust_env=False) as http:

            async def sees_the_nodes() -> bool:
                health = await http.get("/health")
                assert health.status_code == 200 and health.json()["status"] == "ok", health.text
                return bool(health.json()["nodes"] == len(NODES))

            await eventually(sees_the_nodes, "the gateway finds the three nodes in etcd", wait_s=WAIT_S)
            read = await http.get("/api/v1/kv", params={"key": key})
            assert read.status_code == 200 and read.json()["value"] == value.decode(), read.text
            written = await http.post("/api/v1/kv", json={"key": http_key, "value": http_value})
            assert written.status_code == 200 and written.json()["message"] == "success", written.text
        for address in nodes:  # each node: its own key, or forwarded to its owner
            async with grpc.aio.insecure_channel(address) as channel:
                got = await kv_pb2_grpc.KVStub(channel).Get(kv_pb2.GetRequest(key=http_key), timeout=10)
            assert got.found and got.value == http_value.encode()

        argv = services["fluxkv-cdc"]["argv"]
        output = Path(argv[argv.index("--output") + 1])
        assert output.is_relative_to(stack.dir / "volumes" / "cdc-events")
        await eventually(
            lambda: [
                e for e in events(output) if e["key"] == key and e["op"] == "set" and e["value"] == value.decode()
            ],
            "the consumer writes the change event",
            wait_s=WAIT_S,
        )

        pids = [service["pid"] for service in services.values() if service["pid"] is not None]
        assert len(pids) == 7  # etcd, rabbitmq, three nodes, the consumer, the gateway (Jaeger does not run here)
        assert await stack.stop(signal.SIGTERM) == 0, stack.log

    assert processes_marked(stack.mark) == [], stack.log
    assert "native_stack: stopped" in stack.log
    assert sorted(p.name for p in stack.dir.iterdir()) == [
        "logs",
        "stack.json",
        "volumes",
    ]  # etcd's and RabbitMQ's files are gone
    gateway_stopped = logged_at(stack.dir / "logs" / f"{GATEWAY}.log", "shutdown_complete")
    for node in NODES:  # each stopped as SIGTERM stops a node: deregistered first; after the gateway stopped
        assert gateway_stopped <= logged_at(stack.dir / "logs" / f"{node}.log", "deregistered")


@pytest.mark.broker
@pytest.mark.etcd
@pytest.mark.timeout(STOP_TIMEOUT_S)
async def test_a_service_that_fails_to_start_stops_the_others_and_the_stack_exits_1(tmp_path: Path) -> None:
    compose = tmp_path / "compose.yml"
    compose.write_text(f"""
services:
  etcd:
    image: quay.io/coreos/etcd:v3.5.17
    healthcheck:
      test: [CMD, etcdctl, endpoint, health]
  broken-node:
    build:
      context: {ROOT}
    environment:
      FLUX_SERVER_PORT: "50052"
      FLUX_ETCD_ENDPOINTS: etcd:2379
      FLUX_MAX_KEY_BYTES: "0"
    ports:
      - "50052:50052"
    depends_on:
      etcd:
        condition: service_healthy
""")
    async with native(tmp_path, "--compose", str(compose)) as stack:
        assert await asyncio.wait_for(stack.proc.wait(), STOP_TIMEOUT_S) == 1
    assert "native_stack: etcd: starting" in stack.log  # started, then stopped again
    assert "error: broken-node exited with status 2 while starting" in stack.log
    assert "invalid FLUX_MAX_KEY_BYTES" in stack.log
    assert processes_marked(stack.mark) == []
    assert [p.name for p in stack.dir.iterdir()] == ["logs"]  # etcd's files are gone


def test_the_services_get_the_compose_environment_with_local_hosts_ports_and_volumes(tmp_path: Path) -> None:
    """How native_stack.py turns the compose file into processes here (nothing is started)."""
    stack = native_stack.Stack(ROOT / "deploy" / "docker-compose.yml", native_stack.read_env_file(ENV_FILE), tmp_path)
    try:
        etcd, rabbitmq = stack.services["etcd"], stack.services["rabbitmq"]
        node = stack.services["fluxkv-2"]
        assert isinstance(node, native_stack.ProgramService)
        env = node.env
        assert env["FLUX_NODE_ID"] == "fluxkv-2"
        assert env["FLUX_POD_IP"] == env["FLUX_SERVER_HOST"] == "127.0.0.1"
        assert env["FLUX_SERVER_PORT"] == str(node.ports[50053]) and env["FLUX_ADMIN_PORT"] == str(node.ports[6061])
        assert env["FLUX_ETCD_ENDPOINTS"] == f"127.0.0.1:{etcd.ports[2379]}"
        assert env["FLUX_RABBITMQ_URL"] == f"amqp://fluxkv:change-me@127.0.0.1:{rabbitmq.ports[5672]}/"
        assert env["FLUX_AOF_FILENAME"] == str(tmp_path / "volumes" / "fluxkv-2-data" / "fluxkv.aof")
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env and env["OTEL_SDK_DISABLED"] == "true"
        assert env["OTEL_SERVICE_NAME"] == "fluxkv"
        assert node.argv == [sys.executable, str(ROOT / "cmd" / "fluxkv-server")]
        assert node.healthcheck == [sys.executable, "-m", "fluxkv.server.healthcheck"]
        consumer = stack.services["fluxkv-cdc"]
        assert isinstance(consumer, native_stack.ProgramService)
        output = str(tmp_path / "volumes" / "cdc-events" / "cdc-events.jsonl")
        assert consumer.argv == [sys.executable, str(ROOT / "cmd" / "fluxkv-cdc"), "--output", output]
        assert consumer.healthcheck is None
        gateway = stack.services[GATEWAY]
        assert isinstance(gateway, native_stack.ProgramService)
        assert gateway.env["FLUX_GATEWAY_PORT"] == str(gateway.ports[GATEWAY_PORT])
        assert gateway.env["FLUX_SERVER_HOST"] == "127.0.0.1"
        assert gateway.env["FLUX_ETCD_ENDPOINTS"] == f"127.0.0.1:{etcd.ports[2379]}"
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in gateway.env and gateway.env["OTEL_SDK_DISABLED"] == "true"
        assert gateway.argv == [sys.executable, str(ROOT / "cmd" / "fluxkv-gateway")]
        assert gateway.healthcheck is not None and gateway.healthcheck[:2] == [sys.executable, "-c"]
        assert gateway.url == f"http://127.0.0.1:{gateway.ports[GATEWAY_PORT]}/"
        assert stack.describe()["services"][GATEWAY]["url"] == gateway.url
        assert [name for level in stack.levels for name in level] == [
            "etcd", "rabbitmq", "jaeger", "fluxkv-1", "fluxkv-2", "fluxkv-3", "fluxkv-cdc", "fluxkv-gateway"
        ]  # fmt: skip
        assert stack.levels[-1] == [GATEWAY]  # started last, stopped first
        assert len({port for s in stack.services.values() for port in s.ports.values()}) == 1 + 2 + 3 * 2 + 1
    finally:
        stack.close()
    assert list(tmp_path.iterdir()) == []  # the private servers' directories are gone
