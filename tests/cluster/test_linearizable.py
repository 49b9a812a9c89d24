"""Concurrent clients against two nodes in a real etcd, each call sent to either
node (so about half are forwarded to the key's owner), record every call's
invocation, completion and answer; the checker (tests/linearizability.py)
accepts the history only if each key's calls could have happened one at a time
on a single copy of it."""

from __future__ import annotations

import asyncio
import math
import random
import time
import uuid

import grpc
import pytest

from deploy.private_servers import EtcdServer
from fluxkv.proto import kv_pb2 as pb
from fluxkv.proto import kv_pb2_grpc
from tests.conftest import eventually, revision_mismatch, server_process
from tests.linearizability import UNKNOWN, Call, check

pytestmark = pytest.mark.usefixtures("grpc_server")

KEYS = [f"lin:{i}" for i in range(4)]
CLIENTS = 6
CALLS_PER_CLIENT = 120


async def client(stubs: list[kv_pb2_grpc.KVStub], name: str, seed: int, history: list[Call]) -> None:
    rng = random.Random(seed)
    seen: dict[str, int] = {}  # the revision this client last read of each key
    for n in range(CALLS_PER_CLIENT):
        kv = rng.choice(stubs)
        key = rng.choice(KEYS)
        op = rng.choice(["set", "get", "get", "delete", "cas"])
        value = f"{name}-{n}".encode()
        argument: object = None
        invoked = time.monotonic()
        try:
            if op == "set":
                argument = value
                answer: object = (await kv.Set(pb.SetRequest(key=key, value=value), timeout=10)).revision
            elif op == "get":
                got = await kv.Get(pb.GetRequest(key=key), timeout=10)
                answer = (got.value, got.mod_revision) if got.found else None
                seen[key] = got.mod_revision if got.found else 0
            elif op == "delete":
                answer = (await kv.Delete(pb.DeleteRequest(key=key), timeout=10)).deleted
            else:
                expected = seen.get(key, 0)
                argument = (expected, value)
                try:
                    written = await kv.Set(pb.SetRequest(key=key, value=value, expect_revision=expected), timeout=10)
                    answer = ("applied", written.revision)
                except grpc.aio.AioRpcError as exc:
                    if exc.code() != grpc.StatusCode.ABORTED:
                        raise
                    current = int(revision_mismatch(exc)["revision"])
                    answer = ("failed", current)
            completed = time.monotonic()
        except grpc.aio.AioRpcError:
            answer, completed = UNKNOWN, math.inf
        history.append(Call(key, op, argument, answer, invoked, completed))  # type: ignore[arg-type]


async def test_concurrent_calls_through_either_node_are_linearizable_per_key(etcd_server: EtcdServer) -> None:
    prefix = f"/fluxkv-test/{uuid.uuid4().hex[:8]}/"
    env = {"FLUX_ETCD_ENDPOINTS": etcd_server.endpoint, "FLUX_ETCD_PREFIX": prefix}
    with server_process(env=env) as a, server_process(env=env) as b:
        async with grpc.aio.insecure_channel(a.address) as ca, grpc.aio.insecure_channel(b.address) as cb:
            stubs = [kv_pb2_grpc.KVStub(ca), kv_pb2_grpc.KVStub(cb)]

            async def both_see_both() -> bool:
                infos = [await kv.Info(pb.InfoRequest(), timeout=5) for kv in stubs]
                return all("2 nodes in the ring" in _etcd_detail(info) for info in infos)

            await eventually(both_see_both, "each node sees the other in etcd")
            history: list[Call] = []
            await asyncio.gather(*(client(stubs, f"c{i}", i, history) for i in range(CLIENTS)))
    assert len(history) == CLIENTS * CALLS_PER_CLIENT
    assert all(c.answer != UNKNOWN for c in history)  # nothing failed under this load
    assert {c.op for c in history} == {"set", "get", "delete", "cas"}
    assert any(c.op == "cas" and c.answer[0] == "applied" for c in history)  # type: ignore[index]
    assert check(history) == []


def _etcd_detail(info: pb.InfoResponse) -> str:
    return next(s.detail for s in info.subsystems if s.name == "etcd")
