"""Nodes in etcd (a real etcd the fixture starts): registration, leaving the
ring on shutdown or death, coming back, etcd losing its data, forwarding of
keys a node does not own, and --workers."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from deploy.private_servers import EtcdServer
from fluxkv import Client, EtcdNodes, KeyValue, SyncClient
from fluxkv.cluster import forwarding
from fluxkv.cluster.etcd_client import EtcdClient, EtcdError
from fluxkv.cluster.hash_ring import HashRing
from fluxkv.proto import compat_kv_pb2 as compat_pb
from fluxkv.proto import compat_kv_pb2_grpc, kv_pb2_grpc
from fluxkv.proto import kv_pb2 as pb
from fluxkv.rpc.call_context import FORWARDED_BY
from tests.conftest import ROOT, eventually, revision_mismatch, server_process

pytestmark = pytest.mark.usefixtures("grpc_server")

TTL_S = 2
WAIT_S = 20.0


@pytest.fixture
async def etcd(etcd_server: EtcdServer) -> AsyncIterator[EtcdClient]:
    client = EtcdClient([etcd_server.endpoint], timeout_s=2.0)
    yield client
    await client.close()


@pytest.fixture
def prefix() -> str:
    return f"/fluxkv-test/{uuid.uuid4().hex[:8]}/"


def cluster_env(etcd_server: EtcdServer, prefix: str, **extra: str) -> dict[str, str]:
    return {
        "FLUX_ETCD_ENDPOINTS": etcd_server.endpoint,
        "FLUX_ETCD_PREFIX": prefix,
        "FLUX_ETCD_LEASE_TTL_S": str(TTL_S),
        "FLUX_ETCD_TIMEOUT_S": "2",
        **extra,
    }


async def registered(etcd: EtcdClient, prefix: str) -> dict[str, str]:
    pairs, _ = await etcd.get_prefix(prefix)
    return dict(pairs)


async def test_a_node_registers_its_address_under_the_prefix(
    etcd_server: EtcdServer, etcd: EtcdClient, prefix: str
) -> None:
    with server_process(env=cluster_env(etcd_server, prefix)) as node:
        assert await registered(etcd, prefix) == {prefix + node.address: node.address}
        assert f"registered in etcd as {prefix}{node.address}" in node.log
        await eventually(lambda: _ring_size(node.address) == 1, "the node sees itself in the ring")
        async with grpc.aio.insecure_channel(node.address) as channel:
            info = await kv_pb2_grpc.KVStub(channel).Info(pb.InfoRequest())
        etcd_line = next(s for s in info.subsystems if s.name == "etcd")
        assert etcd_line.state == "registered" and "1 nodes in the ring" in etcd_line.detail


async def test_graceful_shutdown_removes_the_registration_before_the_node_stops(
    etcd_server: EtcdServer, etcd: EtcdClient, prefix: str
) -> None:
    with server_process(env=cluster_env(etcd_server, prefix)) as node:
        assert await registered(etcd, prefix)
        assert node.stop(signal.SIGTERM) == 0
        assert await registered(etcd, prefix) == {}  # at once, not after the lease's TTL
    assert node.log.index("deregistered from etcd") < node.log.index("shutdown complete")


async def test_a_killed_node_leaves_the_ring_after_its_ttl_and_comes_back_when_restarted(
    etcd_server: EtcdServer, etcd: EtcdClient, prefix: str
) -> None:
    env = cluster_env(etcd_server, prefix)
    with server_process(env=env) as survivor, server_process(env=env) as victim:
        await eventually(lambda: _ring_size(survivor.address) == 2, "the survivor sees two nodes")
        port = victim.address.rsplit(":", 1)[1]
        victim.stop(signal.SIGKILL)
        killed_at = time.monotonic()
        await eventually(lambda: _registered_without(etcd, prefix, victim.address), "the killed node's key expires")
        assert time.monotonic() - killed_at < TTL_S + 3
        await eventually(lambda: _ring_size(survivor.address) == 1, "the survivor's ring drops the dead node")
        # Every key is now the survivor's: writes through it succeed without forwarding.
        async with grpc.aio.insecure_channel(survivor.address) as channel:
            kv = kv_pb2_grpc.KVStub(channel)
            for i in range(20):
                await kv.Set(pb.SetRequest(key=f"k{i}", value=b"v"), timeout=5)
            assert (await kv.Info(pb.InfoRequest())).key_count == 20
        with server_process("--port", port, env=env) as back:
            assert back.address == victim.address
            await eventually(lambda: _ring_size(survivor.address) == 2, "the restarted node is back in the ring")


async def test_nodes_register_again_when_etcd_comes_back_without_their_keys(
    etcd_server: EtcdServer, etcd: EtcdClient, prefix: str
) -> None:
    with server_process(env=cluster_env(etcd_server, prefix)) as node:
        await asyncio.to_thread(etcd_server.kill)
        shutil.rmtree(etcd_server.data_dir)  # etcd comes back with nothing: no key, no lease
        await asyncio.to_thread(etcd_server.start)
        await eventually(lambda: _registered_as(etcd, prefix, node.address), "the node registers again")
        assert "registered again in etcd" in node.log


def test_etcd_unreachable_at_start_is_an_error_with_fail(prefix: str) -> None:
    env = {"FLUX_ETCD_ENDPOINTS": "127.0.0.1:1", "FLUX_ETCD_AT_START": "fail", "FLUX_ETCD_TIMEOUT_S": "0.5"}
    with pytest.raises(RuntimeError, match="did not start") as failed:
        with server_process(env=env):
            pass
    assert "etcd unreachable at start and FLUX_ETCD_AT_START=fail" in str(failed.value)


async def test_etcd_unreachable_at_start_is_retried_by_default(
    etcd_server: EtcdServer, etcd: EtcdClient, prefix: str
) -> None:
    await asyncio.to_thread(etcd_server.stop)
    with server_process(env=cluster_env(etcd_server, prefix)) as node:
        assert "etcd unreachable at start" in node.log
        await asyncio.to_thread(etcd_server.start)
        await eventually(lambda: _registered_as(etcd, prefix, node.address), "the node registers once etcd is up")


async def test_a_node_forwards_the_keys_it_does_not_own(etcd_server: EtcdServer, prefix: str) -> None:
    env = cluster_env(etcd_server, prefix)
    with server_process(env=env) as a, server_process(env=env) as b:
        await eventually(lambda: _ring_size(a.address) == 2 and _ring_size(b.address) == 2, "both nodes see both")
        ring = HashRing([a.address, b.address])
        keys = [f"key-{i}" for i in range(200)]
        async with grpc.aio.insecure_channel(a.address) as ca, grpc.aio.insecure_channel(b.address) as cb:
            kv_a, kv_b = kv_pb2_grpc.KVStub(ca), kv_pb2_grpc.KVStub(cb)
            for key in keys:  # all through a: about half belong to b
                await kv_a.Set(pb.SetRequest(key=key, value=key.encode()), timeout=5)
            mine = ((FORWARDED_BY, "test"),)  # makes a node answer from its own store
            for key in keys:
                owner, other = (kv_a, kv_b) if ring.owner(key) == a.address else (kv_b, kv_a)
                assert (await owner.Get(pb.GetRequest(key=key), metadata=mine)).value == key.encode()
                assert not (await other.Get(pb.GetRequest(key=key), metadata=mine)).found
                assert (await other.Get(pb.GetRequest(key=key))).value == key.encode()  # forwarded
            # A forwarded call's failure reaches the caller with the owner's details.
            key = next(k for k in keys if ring.owner(k) == b.address)
            revision = (await kv_b.Get(pb.GetRequest(key=key))).mod_revision
            for refused in (
                kv_a.Set(pb.SetRequest(key=key, value=b"again", expect_revision=0)),
                kv_a.Delete(pb.DeleteRequest(key=key, expect_revision=revision + 1)),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await refused
                assert failed.value.code() == grpc.StatusCode.ABORTED
                assert f"(from {b.address}, the key's owner)" in (failed.value.details() or "")
                assert revision_mismatch(failed.value) == {"key": key, "revision": str(revision)}
            many = await kv_b.MultiGet(pb.MultiGetRequest(keys=keys))
            assert [r.value for r in many.results] == [k.encode() for k in keys]
            compat = compat_kv_pb2_grpc.KVServiceStub(cb)
            await compat.Set(compat_pb.SetRequest(key="flux", value="kv"))
            assert (await compat_kv_pb2_grpc.KVServiceStub(ca).Get(compat_pb.GetRequest(key="flux"))).value == "kv"
            infos = [await kv.Info(pb.InfoRequest()) for kv in (kv_a, kv_b)]
            owner_channel, other_channel = (ca, cb) if ring.owner("flux") == a.address else (cb, ca)
            await compat_kv_pb2_grpc.KVServiceStub(other_channel).Del(compat_pb.DelRequest(key="flux"))
            on_owner = compat_kv_pb2_grpc.KVServiceStub(owner_channel)
            assert not (await on_owner.Get(compat_pb.GetRequest(key="flux"), metadata=mine)).found
        assert sum(i.key_count for i in infos) == len(keys) + 1
        assert all(i.key_count > 50 for i in infos)


def test_only_a_unary_call_about_one_key_can_be_forwarded_by_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    router = forwarding.Router("", 160, 1024)
    for method in ("Scan", "Watch", "MultiGet"):  # a prefix; streaming; many keys
        monkeypatch.setattr(forwarding, "ONE_KEY_CALLS", {"fluxkv.v1.KV": (method,)})
        with pytest.raises(ValueError, match=f"fluxkv.v1.KV.{method} is not a unary call about the key"):
            router.forwarding({"fluxkv.v1.KV": {method: lambda request: request}})


async def test_workers_each_serve_and_register_and_stop_together(
    etcd_server: EtcdServer, etcd: EtcdClient, prefix: str
) -> None:
    with server_process("--workers", "2", env=cluster_env(etcd_server, prefix)) as parent:
        await eventually(lambda: _count_registered(etcd, prefix, 2), "both workers register")
        addresses = sorted((await registered(etcd, prefix)).values())
        assert len(set(addresses)) == 2
        await eventually(lambda: all(_ring_size(a) == 2 for a in addresses), "both workers see both")
        async with grpc.aio.insecure_channel(addresses[0]) as channel:
            kv = kv_pb2_grpc.KVStub(channel)
            for i in range(50):
                await kv.Set(pb.SetRequest(key=f"w{i}", value=b"v"), timeout=5)
            found = [(await kv.Get(pb.GetRequest(key=f"w{i}"))).found for i in range(50)]
            assert all(found)
        assert parent.stop(signal.SIGTERM) == 0
        assert await registered(etcd, prefix) == {}
        assert parent.log.count("shutdown complete") == 2
        assert "every worker stopped" in parent.log


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, str(ROOT / "cmd" / "fluxkv"), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _ring_size(address: str) -> int:
    """The number of nodes in the ring of the node at `address`, from its Info."""
    with grpc.insecure_channel(address) as channel:
        info = kv_pb2_grpc.KVStub(channel).Info(pb.InfoRequest(), timeout=5)
    line = next(s for s in info.subsystems if s.name == "etcd")
    found = re.search(r"(\d+) nodes in the ring", line.detail)
    assert found, line.detail
    return int(found.group(1))


async def _registered_without(etcd: EtcdClient, prefix: str, address: str) -> bool:
    return address not in (await registered(etcd, prefix)).values()


async def _registered_as(etcd: EtcdClient, prefix: str, address: str) -> bool:
    try:
        return (await registered(etcd, prefix)).get(prefix + address) == address
    except EtcdError:  # etcd still starting
        return False


async def _count_registered(etcd: EtcdClient, prefix: str, n: int) -> bool:
    return len(await registered(etcd, prefix)) == n


async def test_three_nodes_serve_10000_keys_written_and_read_through_the_sdk(
    etcd_server: EtcdServer, prefix: str
) -> None:
    env = cluster_env(etcd_server, prefix)
    with server_process(env=env) as n1, server_process(env=env) as n2, server_process(env=env) as n3:
        nodes = [n1, n2, n3]
        await eventually(lambda: all(_ring_size(n.address) == 3 for n in nodes), "every node sees three")
        items = {f"user:{i}": f"value-{i}".encode() for i in range(10_000)}
        async with EtcdNodes([etcd_server.endpoint], prefix) as source, Client(source, timeout=10) as client:
            assert source.addresses == {n.address for n in nodes}
            assert all(r.applied for r in await client.multi_set(items))
            read = await client.multi_get(list(items))
            assert [kv.value if kv else None for kv in read] == list(items.values())
            assert (await client.get("user:42")) is not None
        ring = HashRing([n.address for n in nodes])
        mine = ((FORWARDED_BY, "test"),)  # each node answers from its own store
        for node in nodes:
            own = [k for k in items if ring.owner(k) == node.address]
            async with grpc.aio.insecure_channel(node.address) as channel:
                kv = kv_pb2_grpc.KVStub(channel)
                found = await kv.MultiGet(pb.MultiGetRequest(keys=own[:1000]), metadata=mine)
                assert [r.value for r in found.results] == [items[k] for k in own[:1000]]
                assert (await kv.Info(pb.InfoRequest())).key_count == len(own)
            assert len(own) > 2000  # the ring spreads the keys


async def test_the_sdk_stops_routing_to_a_killed_node(etcd_server: EtcdServer, prefix: str) -> None:
    env = cluster_env(etcd_server, prefix)
    with server_process(env=env) as survivor, server_process(env=env) as victim:
        await eventually(lambda: _ring_size(survivor.address) == 2, "the survivor sees both")
        async with EtcdNodes([etcd_server.endpoint], prefix) as source, Client(source, timeout=5) as client:
            assert len(source.addresses) == 2
            victim.stop(signal.SIGKILL)
            await eventually(lambda: source.addresses == {survivor.address}, "the client drops the killed node")
            await client.multi_set({f"k{i}": b"v" for i in range(100)})  # every key goes to the survivor
            assert all(kv is not None for kv in await client.multi_get([f"k{i}" for i in range(100)]))


def test_the_command_line_finds_the_nodes_in_etcd(etcd_server: EtcdServer, prefix: str) -> None:
    env = cluster_env(etcd_server, prefix)
    with server_process(env=env) as a, server_process(env=env):
        etcd = ["--etcd", etcd_server.endpoint, "--etcd-prefix", prefix]
        assert run_cli(*etcd, "set", "greeting", "hello").returncode == 0
        got = run_cli(*etcd, "get", "greeting")
        assert (got.returncode, got.stdout) == (0, "hello\n")
        info = run_cli(*etcd, "info")
        assert info.returncode == 0 and info.stdout.count("node_id: ") == 2
        assert a.address in info.stdout
    nobody = run_cli("--etcd", etcd_server.endpoint, "--etcd-prefix", "/nobody/", "get", "k")
    assert nobody.returncode == 3 and "no node is registered under /nobody/" in nobody.stderr


def test_the_blocking_client_follows_etcd(etcd_server: EtcdServer, prefix: str) -> None:
    with server_process(env=cluster_env(etcd_server, prefix)) as node:
        with SyncClient.from_etcd([etcd_server.endpoint], prefix=prefix, timeout=5) as client:
            client.set("sync", b"twin")
            assert client.get("sync") == KeyValue("sync", b"twin", 1, 0)
        with grpc.insecure_channel(node.address) as channel:
            assert kv_pb2_grpc.KVStub(channel).Get(pb.GetRequest(key="sync")).value == b"twin"


async def test_a_worker_that_dies_is_started_again(etcd_server: EtcdServer, etcd: EtcdClient, prefix: str) -> None:
    with server_process("--workers", "2", env=cluster_env(etcd_server, prefix)) as parent:
        await eventually(lambda: _count_registered(etcd, prefix, 2), "both workers register")
        first = re.search(r"worker 0 started \(pid (\d+)\)", parent.log)
        assert first
        os.kill(int(first.group(1)), signal.SIGKILL)
        await eventually(lambda: parent.log.count("worker 0 started") == 2, "the parent starts worker 0 again")
        assert re.search(r"worker 0 \(pid \d+\) exited with status -9; starting it again in 1 s", parent.log)
        await eventually(lambda: parent.log.count("serving on") == 3, "the new worker 0 serves")
        await eventually(lambda: _count_registered(etcd, prefix, 2), "the new worker 0 registers")
        assert parent.stop(signal.SIGTERM) == 0, parent.log


async def test_workers_stop_when_their_parent_is_killed(etcd_server: EtcdServer, etcd: EtcdClient, prefix: str) -> None:
    with server_process("--workers", "2", env=cluster_env(etcd_server, prefix)) as parent:
        await eventually(lambda: _count_registered(etcd, prefix, 2), "both workers register")
        pids = [int(pid) for pid in re.findall(r"worker \d started \(pid (\d+)\)", parent.log)]
        assert parent.stop(signal.SIGKILL) == -signal.SIGKILL
        # The kernel tells each worker (SIGTERM): they deregister and exit, not waiting for their leases.
        await eventually(lambda: not any(_alive(pid) for pid in pids), "the workers exit")
        assert await registered(etcd, prefix) == {}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
