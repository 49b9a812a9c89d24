"""Tokens between nodes, with two real nodes through a real etcd: forwarding
passes the caller's authorization on, and the key's owner checks it again
against its own tokens file."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import grpc
import pytest

from deploy.private_servers import EtcdServer
from fluxkv.cluster.hash_ring import HashRing
from fluxkv.proto import compat_kv_pb2 as compat_pb
from fluxkv.proto import compat_kv_pb2_grpc, kv_pb2_grpc
from fluxkv.proto import kv_pb2 as pb
from fluxkv.rpc.call_context import FORWARDED_BY
from fluxkv.security import tokens
from tests.conftest import bearer, eventually, server_process

pytestmark = pytest.mark.usefixtures("grpc_server")


def _ring_size(address: str, secret: str) -> int:
    with grpc.insecure_channel(address) as channel:
        info = kv_pb2_grpc.KVStub(channel).Info(pb.InfoRequest(), metadata=bearer(secret), timeout=5)
    line = next(s for s in info.subsystems if s.name == "etcd")
    found = re.search(r"(\d+) nodes in the ring", line.detail)
    return int(found.group(1)) if found else 0


async def test_a_forwarded_call_is_checked_again_by_the_owner(etcd_server: EtcdServer, tmp_path: Path) -> None:
    # The same two tokens on both nodes, except that "app" may write on a but only read on b:
    # what a lets through, b (the owner of b's keys) still refuses.
    app, ops = tokens.new_secret(), tokens.new_secret()
    (tmp_path / "a.toml").write_text(
        tokens.toml_table("app", app, tokens.Role.WRITE) + tokens.toml_table("ops", ops, tokens.Role.WRITE)
    )
    (tmp_path / "b.toml").write_text(
        tokens.toml_table("app", app, tokens.Role.READ) + tokens.toml_table("ops", ops, tokens.Role.WRITE)
    )
    prefix = f"/fluxkv-test/{uuid.uuid4().hex[:8]}/"
    env = {"FLUX_ETCD_ENDPOINTS": etcd_server.endpoint, "FLUX_ETCD_PREFIX": prefix, "FLUX_ETCD_LEASE_TTL_S": "2"}
    with (
        server_process(env={**env, "FLUX_AUTH_TOKENS_FILE": str(tmp_path / "a.toml")}) as a,
        server_process(env={**env, "FLUX_AUTH_TOKENS_FILE": str(tmp_path / "b.toml")}) as b,
    ):
        await eventually(lambda: _ring_size(a.address, ops) == _ring_size(b.address, ops) == 2, "both see both")
        ring = HashRing([a.address, b.address])
        keys = [f"key-{i}" for i in range(40)]
        on_a = next(k for k in keys if ring.owner(k) == a.address)
        on_b = next(k for k in keys if ring.owner(k) == b.address)
        async with grpc.aio.insecure_channel(a.address) as ca, grpc.aio.insecure_channel(b.address) as cb:
            kv_a, kv_b = kv_pb2_grpc.KVStub(ca), kv_pb2_grpc.KVStub(cb)

            # app's Set of b's key, sent to a: a lets it through and forwards it; b refuses it.
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await kv_a.Set(pb.SetRequest(key=on_b, value=b"v"), metadata=bearer(app), timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            details = refused.value.details() or ""
            assert "token 'app' (role read) may not call fluxkv.v1.KV/Set" in details
            assert f"(from {b.address}, the key's owner)" in details
            assert app not in details
            compat_a = compat_kv_pb2_grpc.KVServiceStub(ca)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await compat_a.Set(compat_pb.SetRequest(key=on_b, value="v"), metadata=bearer(app), timeout=10)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            # a's own keys are a's to decide.
            await kv_a.Set(pb.SetRequest(key=on_a, value=b"a"), metadata=bearer(app), timeout=10)

            # The caller's token travels with the forwarded call: without it, b would answer UNAUTHENTICATED.
            await kv_a.Set(pb.SetRequest(key=on_b, value=b"b"), metadata=bearer(ops), timeout=10)
            here = (*bearer(ops), (FORWARDED_BY, "test"))  # b answers from its own store
            assert (await kv_b.Get(pb.GetRequest(key=on_b), metadata=here)).value == b"b"
            assert (await kv_b.Get(pb.GetRequest(key=on_a), metadata=bearer(app))).value == b"a"  # to a, and back
            many = await kv_b.MultiGet(pb.MultiGetRequest(keys=[on_a, on_b]), metadata=bearer(app), timeout=10)
            assert [r.value for r in many.results] == [b"a", b"b"]

            # Without a token the first node refuses it: nothing is forwarded.
            forwarded = await _forwarded(kv_a, ops)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await kv_a.Set(pb.SetRequest(key=on_b, value=b"v"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert await _forwarded(kv_a, ops) == forwarded


async def test_the_owner_checks_a_call_the_first_node_did_not(etcd_server: EtcdServer, tmp_path: Path) -> None:
    # a has no tokens file (it checks nothing), b has one: b still decides about its keys.
    secret = tokens.new_secret()
    (tmp_path / "b.toml").write_text(tokens.toml_table("reader", secret, tokens.Role.READ))
    prefix = f"/fluxkv-test/{uuid.uuid4().hex[:8]}/"
    env = {"FLUX_ETCD_ENDPOINTS": etcd_server.endpoint, "FLUX_ETCD_PREFIX": prefix, "FLUX_ETCD_LEASE_TTL_S": "2"}
    with (
        server_process(env=env) as a,
        server_process(env={**env, "FLUX_AUTH_TOKENS_FILE": str(tmp_path / "b.toml")}) as b,
    ):
        await eventually(lambda: _ring_size(a.address, "") == _ring_size(b.address, secret) == 2, "both see both")
        ring = HashRing([a.address, b.address])
        on_b = next(k for k in (f"key-{i}" for i in range(40)) if ring.owner(k) == b.address)
        async with grpc.aio.insecure_channel(a.address) as ca:
            kv_a = kv_pb2_grpc.KVStub(ca)
            for metadata, code in ((bearer(secret), "PERMISSION_DENIED"), ((), "UNAUTHENTICATED")):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await kv_a.Set(pb.SetRequest(key=on_b, value=b"v"), metadata=metadata, timeout=10)
                assert refused.value.code().name == code
                assert f"(from {b.address}, the key's owner)" in (refused.value.details() or "")
            assert not (await kv_a.Get(pb.GetRequest(key=on_b), metadata=bearer(secret), timeout=10)).found


async def _forwarded(kv: kv_pb2_grpc.KVStub, secret: str) -> int:
    info = await kv.Info(pb.InfoRequest(), metadata=bearer(secret), timeout=5)
    line = next(s for s in info.subsystems if s.name == "etcd")
    found = re.search(r"(\d+) calls forwarded", line.detail)
    assert found, line.detail
    return int(found.group(1))
