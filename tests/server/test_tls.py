"""TLS on the gRPC and admin ports, and mutual TLS: real handshakes with grpcio
clients, the SDK, the CLI and the health check, with certificates made for the
test session (tests/conftest.py: certificates). A TLS node serves on grpcio
whatever FLUX_GRPC_SERVER says (pygrpc-native has no TLS), so each test runs
with both settings and checks that the node says where it serves."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import httpx
import pytest

from deploy.private_servers import EtcdServer
from fluxkv import TLS, Client, SyncClient, Unavailable
from fluxkv.cluster.hash_ring import HashRing
from fluxkv.proto import compat_kv_pb2, compat_kv_pb2_grpc, kv_pb2, kv_pb2_grpc
from fluxkv.rpc.call_context import FORWARDED_BY
from fluxkv.server import healthcheck
from fluxkv.server.node import Node
from tests.conftest import ROOT, Certificates, eventually, http_get, server_process, settings

pytestmark = pytest.mark.usefixtures("grpc_server")


@asynccontextmanager
async def tls_node(certificates: Certificates, mutual: bool = False) -> AsyncIterator[Node]:
    node = Node(settings(**certificates.server_settings(mutual)))
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


def client_credentials(
    certificates: Certificates, ca: str | None = None, client: bool = False
) -> grpc.ChannelCredentials:
    return TLS(
        ca or certificates.ca,
        certificates.client_cert if client else "",
        certificates.client_key if client else "",
    ).channel_credentials()


def localhost(node: Node) -> str:
    """The node's address by name: the certificate is for localhost and 127.0.0.1 alike."""
    return f"localhost:{node.port}"


async def test_a_tls_node_serves_verified_clients_on_grpcio_and_says_so(
    certificates: Certificates, grpc_server: str
) -> None:
    async with tls_node(certificates) as node:
        for address in (node.address, localhost(node)):
            async with grpc.aio.secure_channel(address, client_credentials(certificates)) as channel:
                kv = kv_pb2_grpc.KVStub(channel)
                await kv.Set(kv_pb2.SetRequest(key="k", value=b"v"))
                assert (await kv.Get(kv_pb2.GetRequest(key="k"))).value == b"v"
                compat = compat_kv_pb2_grpc.KVServiceStub(channel)
                assert (await compat.Get(compat_kv_pb2.GetRequest(key="k"))).value == "v"
                info = await kv.Info(kv_pb2.InfoRequest())
        grpc_state = {s.name: s for s in info.subsystems}["grpc"]
        assert grpc_state.state == "grpcio"
        assert "over TLS" in grpc_state.detail
        assert ("on grpcio, as pygrpc-native has no TLS" in grpc_state.detail) == (grpc_server == "native")


async def test_a_plaintext_client_and_a_client_with_the_wrong_ca_are_refused(certificates: Certificates) -> None:
    async with tls_node(certificates) as node:
        async with grpc.aio.insecure_channel(node.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as plaintext:
                await kv_pb2_grpc.KVStub(channel).Get(kv_pb2.GetRequest(key="k"), timeout=10)
        async with grpc.aio.secure_channel(
            node.address, client_credentials(certificates, ca=certificates.other_ca)
        ) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as wrong_ca:
                await kv_pb2_grpc.KVStub(channel).Get(kv_pb2.GetRequest(key="k"), timeout=10)
        assert node.store.revision == 0
    assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    assert wrong_ca.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "handshake" in (wrong_ca.value.details() or "").lower() or "ssl" in (wrong_ca.value.details() or "").lower()


async def test_mutual_tls_refuses_a_client_without_a_certificate_of_its_ca(certificates: Certificates) -> None:
    async with tls_node(certificates, mutual=True) as node:
        async with grpc.aio.secure_channel(node.address, client_credentials(certificates, client=True)) as channel:
            answer = await kv_pb2_grpc.KVStub(channel).Set(kv_pb2.SetRequest(key="k", value=b"v"))
            assert answer.revision == 1
            info = await kv_pb2_grpc.KVStub(channel).Info(kv_pb2.InfoRequest())
        assert (
            "with client certificates signed by FLUX_TLS_CLIENT_CA_FILE"
            in {s.name: s.detail for s in info.subsystems}["grpc"]
        )
        no_certificate = client_credentials(certificates)
        other_ca = TLS(certificates.ca, certificates.other_client_cert, certificates.other_client_key)
        for credentials in (no_certificate, other_ca.channel_credentials()):
            async with grpc.aio.secure_channel(node.address, credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await kv_pb2_grpc.KVStub(channel).Set(kv_pb2.SetRequest(key="k", value=b"w"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert node.store.revision == 1


async def test_the_sdk_connects_over_tls_and_mutual_tls(certificates: Certificates) -> None:
    async with tls_node(certificates, mutual=True) as node:
        tls = TLS(certificates.ca, certificates.client_cert, certificates.client_key)
        async with Client(node.address, tls=tls) as client:
            await client.set("a", b"1")
            assert (await client.get("a")).value == b"1"  # type: ignore[union-attr]

        def read_blocking() -> bytes | None:  # in a thread: the node serves on this test's event loop
            with SyncClient(localhost(node), tls=tls) as sync:
                item = sync.get("a")
            return None if item is None else item.value

        assert await asyncio.to_thread(read_blocking) == b"1"
        async with Client(node.address, tls=TLS(certificates.ca), timeout=5) as client:
            with pytest.raises(Unavailable):
                await client.get("a")


async def test_the_admin_port_serves_https_with_the_nodes_certificate(certificates: Certificates) -> None:
    async with tls_node(certificates, mutual=True) as node:
        assert node.admin is not None
        assert node.admin.url.startswith("https://")
        context = ssl.create_default_context(cafile=certificates.ca)
        # No client certificate: probes of /healthz have none, even under mutual TLS.
        answer = await http_get(node.admin.port, "/healthz", tls=context)
        assert (answer.status, answer.body) == (200, b"ok\n")
        with pytest.raises(httpx.TransportError):  # plain HTTP to the HTTPS port
            await http_get(node.admin.port, "/healthz")


def test_the_cli_and_the_health_check_speak_tls(certificates: Certificates) -> None:
    with server_process(env=certificates.server_environ(mutual=True)) as server:
        cli = [sys.executable, str(ROOT / "cmd" / "fluxkv"), "--addr", server.address, "--tls-ca", certificates.ca]
        client = ["--tls-cert", certificates.client_cert, "--tls-key", certificates.client_key]
        written = subprocess.run([*cli, *client, "set", "k", "v"], capture_output=True, timeout=60, check=False)
        assert written.returncode == 0, written.stderr
        read = subprocess.run([*cli, *client, "get", "k"], capture_output=True, timeout=60, check=False)
        assert (read.returncode, read.stdout) == (0, b"v\n")
        refused = subprocess.run([*cli, "get", "k"], capture_output=True, timeout=60, check=False)
        assert refused.returncode == 3, refused.stderr
        peer = TLS(certificates.ca, certificates.cert, certificates.key)
        assert healthcheck.check(server.address, peer=peer) is None
        assert healthcheck.check(server.address) is not None
        assert "over TLS with client certificates signed by FLUX_TLS_CLIENT_CA_FILE" in server.log


def test_a_tls_node_asked_for_pygrpc_native_says_it_serves_on_grpcio(certificates: Certificates) -> None:
    with server_process(env={**certificates.server_environ(), "FLUX_GRPC_SERVER": "native"}) as server:
        server.wait_for("pygrpc-native has no TLS: serving TLS on grpcio")
        assert f"serving on {server.address} (gRPC on grpcio" in server.log


async def test_nodes_forward_to_each_other_over_mutual_tls(certificates: Certificates, etcd_server: EtcdServer) -> None:
    env = {
        **certificates.server_environ(mutual=True),
        "FLUX_ETCD_ENDPOINTS": etcd_server.endpoint,
        "FLUX_ETCD_PREFIX": f"/fluxkv-tls-{uuid.uuid4().hex[:8]}/",
    }
    credentials = client_credentials(certificates, client=True)
    with server_process(env=env) as a, server_process(env=env) as b:
        async with (
            grpc.aio.secure_channel(a.address, credentials) as ca,
            grpc.aio.secure_channel(b.address, credentials) as cb,
        ):
            kv_a, kv_b = kv_pb2_grpc.KVStub(ca), kv_pb2_grpc.KVStub(cb)

            async def both_in_ring() -> bool:
                infos = [await kv.Info(kv_pb2.InfoRequest()) for kv in (kv_a, kv_b)]
                return all("2 nodes in the ring" in {s.name: s.detail for s in i.subsystems}["etcd"] for i in infos)

            await eventually(both_in_ring, "both nodes see both")
            ring = HashRing([a.address, b.address])
            keys = [f"key-{i}" for i in range(40)]
            for key in keys:  # all through a: about half are forwarded to b, over mutual TLS
                await kv_a.Set(kv_pb2.SetRequest(key=key, value=key.encode()), timeout=10)
            on_b = [key for key in keys if ring.owner(key) == b.address]
            assert on_b
            own = ((FORWARDED_BY, "test"),)  # makes b answer from its own store
            for key in on_b:
                assert (await kv_b.Get(kv_pb2.GetRequest(key=key), metadata=own)).value == key.encode()


@pytest.mark.parametrize("engine", ["lean", "grpcio"])
def test_fluxkv_bench_loads_a_mutual_tls_node_on_either_engine(
    certificates: Certificates, engine: str, tmp_path: Path
) -> None:
    out = tmp_path / "result.json"
    tls = ["--tls-ca", certificates.ca, "--tls-cert", certificates.client_cert, "--tls-key", certificates.client_key]
    load = ["--engine", engine, "-n", "500", "-c", "10", "--warmup", "0", "--json", str(out)]
    with server_process(env=certificates.server_environ(mutual=True)) as server:
        done = subprocess.run(
            [sys.executable, str(ROOT / "cmd" / "fluxkv-bench"), "--addr", server.address, *load, *tls],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert (record["successes"], record["failures"]) == (500, {})
    assert record["settings"]["tls_ca"] == certificates.ca
