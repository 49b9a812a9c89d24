"""fluxkv-server as a real process: start-up, configuration errors, graceful
shutdown under load, and a client generated from Flux-KV's own proto."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from fluxkv.proto import kv_pb2 as pb
from fluxkv.proto import kv_pb2_grpc
from tests.conftest import BROKER, ROOT, Names, ServerProcess, server_process, server_version

SERVER = [sys.executable, str(ROOT / "cmd" / "fluxkv-server")]


def run_server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a server that is expected to refuse to start."""
    return subprocess.run([*SERVER, *args], capture_output=True, text=True, timeout=60, env=env)


def test_starts_standalone_and_says_so(server: ServerProcess, grpc_server: str) -> None:
    served_by = server_version(grpc_server)
    assert f"(gRPC on {served_by} in plaintext, no etcd registration, no CDC publishing, no persistence)" in server.log
    assert server.address.startswith("127.0.0.1:")

    async def grpc_subsystem() -> str:
        async with grpc.aio.insecure_channel(server.address) as channel:
            info = await kv_pb2_grpc.KVStub(channel).Info(pb.InfoRequest(), timeout=10)
        return {s.name: s.detail for s in info.subsystems}["grpc"]

    # uvloop only where it measurably helps (bench/README.md): under grpcio.
    loop = {"native": "asyncio", "grpcio": "uvloop"}[grpc_server]
    detail = asyncio.run(grpc_subsystem())
    assert detail.endswith(f"(FLUX_GRPC_SERVER={grpc_server}, FLUX_EVENT_LOOP=auto) on {loop}'s event loop")


@pytest.mark.usefixtures("grpc_server")
def test_with_cdc_it_says_where_it_publishes_without_the_password(names: Names) -> None:
    env = {"FLUX_RABBITMQ_URL": BROKER, "FLUX_CDC_EXCHANGE": names.exchange, "FLUX_CDC_QUEUE": names.queue}
    with server_process(env=env) as server:
        assert "CDC to amqp://guest:***@127.0.0.1:5672/ (policy block when full)" in server.log
        assert server.stop() == 0
    assert "the broker confirmed every CDC event" in server.log
    assert "guest:guest" not in server.log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_server_gracefully(server: ServerProcess, sig: signal.Signals) -> None:
    assert server.stop(sig) == 0
    assert f"received {sig.name}" in server.log
    assert "shutdown complete" in server.log


def test_graceful_shutdown_under_load_loses_no_acknowledged_write(server: ServerProcess) -> None:
    acknowledged: list[int] = []
    failures: list[grpc.StatusCode] = []

    async def load() -> None:
        enough = asyncio.Event()

        async def writer(channel: grpc.aio.Channel, n: int) -> None:
            stub = kv_pb2_grpc.KVStub(channel)
            i = 0
            while True:
                try:
                    reply = await stub.Set(pb.SetRequest(key=f"w{n}:{i}", value=b"v"), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    failures.append(exc.code())
                    return
                acknowledged.append(reply.revision)
                if len(acknowledged) >= 500:
                    enough.set()
                i += 1

        async with grpc.aio.insecure_channel(server.address) as channel:
            writers = [asyncio.create_task(writer(channel, n)) for n in range(20)]
            await asyncio.wait_for(enough.wait(), 60)
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*writers), 60)

    asyncio.run(load())
    assert server.wait() == 0
    match = re.search(r"shutdown complete at revision (\d+)", server.log)
    assert match, server.log
    final_revision = int(match.group(1))
    # Every acknowledged write was applied, and nothing else was.
    assert len(acknowledged) == len(set(acknowledged)) == final_revision
    # Calls that raced the shutdown were refused (never applied): grpcio
    # cancels those that reached the closing server, the rest find it gone.
    assert failures and set(failures) <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--port", "http"], {}, "invalid --port: expected an integer, got 'http'"),
        ([], {"FLUX_SERVER_PORT": "70000"}, "invalid FLUX_SERVER_PORT: expected an integer from 0 to 65535, got 70000"),
        ([], {"FLUX_MAX_KEY_BYTES": "0"}, "invalid FLUX_MAX_KEY_BYTES: expected an integer of at least 1, got 0"),
        ([], {"FLUX_LOG_LEVEL": "loud"}, "invalid FLUX_LOG_LEVEL: expected one of debug, info, warning, error"),
        ([], {"FLUX_SHUTDOWN_GRACE_S": "soon"}, "invalid FLUX_SHUTDOWN_GRACE_S: expected a number, got 'soon'"),
        ([], {"FLUX_MAX_MESSAGE_BYTES": "1000"}, "FLUX_MAX_MESSAGE_BYTES (1000) must be at least"),
        (
            [],
            {"FLUX_RABBITMQ_URL": "http://u:secret@h/"},
            "FLUX_RABBITMQ_URL must start with amqp:// or amqps://, got 'http://u:***@h/'",
        ),
        ([], {"FLUX_CDC_FULL_POLICY": "wait"}, "invalid FLUX_CDC_FULL_POLICY: expected one of block, drop, got 'wait'"),
        (
            [],
            {"FLUX_CDC_QUEUE_EVENTS": "10"},
            "FLUX_CDC_QUEUE_EVENTS (10) must be at least FLUX_MAX_BATCH_ITEMS",
        ),
    ],
)
def test_invalid_setting_is_refused_at_start_with_its_name(args: list[str], env: dict[str, str], message: str) -> None:
    result = run_server(*args, env={**_base_env(), **env})
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_server("--port", str(port), env={**_base_env(), "FLUX_ADMIN_PORT": "0"})
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.usefixtures("grpc_server")
def test_flags_override_environment_and_unknown_variables_are_reported() -> None:
    env = {"FLUX_NODE_ID": "from-env", "FLUX_MAX_KEY_BYTES": "64", "FLUX_NO_SUCH_THING": "1"}
    with server_process("--node-id", "from-flag", env=env) as server:
        with grpc.insecure_channel(server.address) as channel:
            info = kv_pb2_grpc.KVStub(channel).Info(pb.InfoRequest(), timeout=10)
        assert info.node_id == "from-flag"
        assert info.limits.max_key_bytes == 64
        assert server.stop() == 0
    assert "ignoring FLUX_NO_SUCH_THING: no such setting" in server.log


def test_a_client_generated_from_flux_kv_proto_works_unchanged(server: ServerProcess, tmp_path: Path) -> None:
    from grpc_tools import protoc

    proto_dir = ROOT / "tests" / "fluxkv_go"
    status = protoc.main(
        ["protoc", f"-I{proto_dir}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", "kv.proto"]
    )
    assert status == 0
    result = subprocess.run(
        [sys.executable, str(proto_dir / "client.py"), server.address],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_base_env(), "PYTHONPATH": str(tmp_path)},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "set True",
        "get True from a Flux-KV client",
        "del True",
        "get False ''",
    ]


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}
