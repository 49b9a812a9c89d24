"""Tokens on a node (FLUX_AUTH_TOKENS_FILE), over real gRPC on both servers: the
full matrix of role x method x prefix, the refusals' codes and messages,
batches refused whole, Scan and Watch prefixes, health open and reflection
closed, the counts in /metrics, and the admin port's pages."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from fluxkv.proto import compat_kv_pb2 as compat_pb
from fluxkv.proto import compat_kv_pb2_grpc, kv_pb2_grpc
from fluxkv.proto import kv_pb2 as pb
from fluxkv.server.auth import NodeAuth
from fluxkv.server.node import Node
from tests.conftest import Answer, bearer, http_get, running_node, write_tokens

pytestmark = pytest.mark.usefixtures("grpc_server")

OK = grpc.StatusCode.OK
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
INSIDE, OUTSIDE = "orders/", "users/"

# The permission table, written out here rather than read from the code it checks.
READ_METHODS = {"Get", "MultiGet", "Scan", "Watch", "Info", "compat.Get"}
WRITE_METHODS = READ_METHODS | {"Set", "Delete", "MultiSet", "compat.Set", "compat.Del"}
ADMIN_METHODS = WRITE_METHODS | {"RewriteAof"}
ALLOWED = {"read": READ_METHODS, "write": WRITE_METHODS, "admin": ADMIN_METHODS}
KEYLESS = {"Info", "RewriteAof"}
METHODS = sorted(ADMIN_METHODS)

# A token per role, for every key and for keys under INSIDE only.
TOKENS = {
    f"{role}-{scope}": (role, [INSIDE] if scope == "orders" else [])
    for role in ("read", "write", "admin")
    for scope in ("all", "orders")
}


@dataclass
class Calls:
    kv: kv_pb2_grpc.KVStub
    compat: compat_kv_pb2_grpc.KVServiceStub
    secrets: dict[str, str]

    async def code(self, method: str, where: str, metadata: Any) -> tuple[grpc.StatusCode, str]:
        """Call `method` about keys under `where` (for a batch: one key under INSIDE and one under
        `where`) with `metadata`; its status code and details. A Watch that is let through is
        shown to be live: a change written under its prefix reaches it."""
        try:
            if method == "Watch":
                return await self._watch(where, metadata)
            await _CALLS[method](self, where, metadata)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return OK, ""

    async def _watch(self, where: str, metadata: Any) -> tuple[grpc.StatusCode, str]:
        call = self.kv.Watch(pb.WatchRequest(prefix=where), metadata=metadata, timeout=10)
        try:
            await call.initial_metadata()
            if call.done():  # refused: its status came with the headers
                return await call.code(), await call.details() or ""
            await self.kv.Set(
                pb.SetRequest(key=where + "watched", value=b"w"), metadata=bearer(self.secrets["admin-all"])
            )
            response = await call.read()
            assert response.events[0].key == where + "watched", response
            return OK, ""
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        finally:
            call.cancel()


def _both(where: str) -> list[str]:
    return [INSIDE + "a", where + "b"]


_CALLS: dict[str, Callable[[Calls, str, Any], Awaitable[Any]]] = {
    "Get": lambda c, w, md: c.kv.Get(pb.GetRequest(key=w + "k"), metadata=md),
    "Set": lambda c, w, md: c.kv.Set(pb.SetRequest(key=w + "k", value=b"v"), metadata=md),
    "Delete": lambda c, w, md: c.kv.Delete(pb.DeleteRequest(key=w + "k"), metadata=md),
    "MultiGet": lambda c, w, md: c.kv.MultiGet(pb.MultiGetRequest(keys=_both(w)), metadata=md),
    "MultiSet": lambda c, w, md: c.kv.MultiSet(
        pb.MultiSetRequest(items=[pb.SetRequest(key=k, value=b"v") for k in _both(w)]), metadata=md
    ),
    "Scan": lambda c, w, md: c.kv.Scan(pb.ScanRequest(prefix=w), metadata=md),
    "Info": lambda c, w, md: c.kv.Info(pb.InfoRequest(), metadata=md),
    "RewriteAof": lambda c, w, md: c.kv.RewriteAof(pb.RewriteAofRequest(), metadata=md),
    "compat.Get": lambda c, w, md: c.compat.Get(compat_pb.GetRequest(key=w + "k"), metadata=md),
    "compat.Set": lambda c, w, md: c.compat.Set(compat_pb.SetRequest(key=w + "k", value="v"), metadata=md),
    "compat.Del": lambda c, w, md: c.compat.Del(compat_pb.DelRequest(key=w + "k"), metadata=md),
}


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[Node, Calls]]:
    secrets = write_tokens(tmp_path / "tokens.toml", TOKENS)
    # With an append-only file, so that RewriteAof does its work when let through.
    overrides = {"auth_tokens_file": str(tmp_path / "tokens.toml"), "aof_filename": str(tmp_path / "node.aof")}
    async with running_node(**overrides) as (node, kv):
        async with grpc.aio.insecure_channel(node.address) as channel:
            yield node, Calls(kv, compat_kv_pb2_grpc.KVServiceStub(channel), secrets)


def expected(token: str, method: str, where: str) -> grpc.StatusCode:
    role, prefixes = TOKENS[token]
    if method not in ALLOWED[role]:
        return DENIED
    if prefixes and method not in KEYLESS and where == OUTSIDE:
        return DENIED
    return OK


@pytest.mark.parametrize("token", sorted(TOKENS))
async def test_the_matrix_of_role_method_and_prefix(secured: tuple[Node, Calls], token: str) -> None:
    _, calls = secured
    metadata = bearer(calls.secrets[token])
    want, got, messages = {}, {}, []
    for method in METHODS:
        for where in (INSIDE, OUTSIDE):
            want[method, where] = expected(token, method, where)
            got[method, where], details = await calls.code(method, where, metadata)
            messages.append(details)
            if got[method, where] == DENIED:
                assert f"token {token!r}" in details, details
    assert got == want
    assert not any(calls.secrets[t] in m for t in TOKENS for m in messages)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), "this node needs a token: send the metadata 'authorization: Bearer <token>'"),
        ((("authorization", "Bearer not-a-token-of-this-node"),), "this node does not know the token sent"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "the authorization metadata is not a Bearer token"),
        ((("authorization", "Bearer"),), "the authorization metadata is not a Bearer token"),
    ],
)
async def test_without_a_known_token_every_method_is_unauthenticated(
    secured: tuple[Node, Calls], metadata: Any, message: str
) -> None:
    _, calls = secured
    for method in METHODS:
        code, details = await calls.code(method, INSIDE, metadata)
        assert (method, code) == (method, UNAUTHENTICATED)
        assert message in details
        assert "not-a-token-of-this-node" not in details


async def test_the_scheme_is_case_insensitive_and_a_wrong_token_is_never_echoed(
    secured: tuple[Node, Calls],
) -> None:
    _, calls = secured
    secret = calls.secrets["read-all"]
    assert (await calls.code("Get", INSIDE, (("authorization", f"bearer  {secret} "),)))[0] == OK
    near_miss = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    code, details = await calls.code("Get", INSIDE, (("authorization", f"Bearer {near_miss}"),))
    assert code == UNAUTHENTICATED
    assert near_miss not in details and secret not in details


async def test_refusals_name_what_was_refused(secured: tuple[Node, Calls]) -> None:
    _, calls = secured
    read, write = bearer(calls.secrets["read-orders"]), bearer(calls.secrets["write-orders"])
    cases = [
        (calls.kv.Set(pb.SetRequest(key="orders/1", value=b"v"), metadata=read),
         "token 'read-orders' (role read) may not call fluxkv.v1.KV/Set: it needs role write"),
        (calls.kv.RewriteAof(pb.RewriteAofRequest(), metadata=write),
         "token 'write-orders' (role write) may not call fluxkv.v1.KV/RewriteAof: it needs role admin"),
        (calls.kv.Get(pb.GetRequest(key="users/7"), metadata=read),
         "token 'read-orders' may not touch key 'users/7' in fluxkv.v1.KV/Get: it may touch keys under 'orders/'"),
        (calls.kv.Scan(pb.ScanRequest(prefix="ord"), metadata=read),
         "token 'read-orders' may not touch prefix 'ord' in fluxkv.v1.KV/Scan"),
        (calls.kv.Scan(pb.ScanRequest(), metadata=read),
         "token 'read-orders' may not touch every key (an empty prefix) in fluxkv.v1.KV/Scan"),
        (calls.compat.Set(compat_pb.SetRequest(key="users/1", value="v"), metadata=write),
         "token 'write-orders' may not touch key 'users/1' in service.KVService/Set"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == DENIED
        assert message in (refused.value.details() or "")


async def test_a_batch_with_one_key_outside_the_prefixes_is_refused_whole(secured: tuple[Node, Calls]) -> None:
    _, calls = secured
    write, admin = bearer(calls.secrets["write-orders"]), bearer(calls.secrets["admin-all"])
    keys = ["orders/1", "orders/2", "users/3", "orders/4"]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await calls.kv.MultiSet(
            pb.MultiSetRequest(items=[pb.SetRequest(key=k, value=b"v") for k in keys]), metadata=write
        )
    assert refused.value.code() == DENIED
    assert "items[2], key 'users/3'" in (refused.value.details() or "")
    assert "the whole MultiSet is refused" in (refused.value.details() or "")
    # Nothing was written, not even the keys inside the prefixes.
    got = await calls.kv.MultiGet(pb.MultiGetRequest(keys=keys), metadata=admin)
    assert [r.found for r in got.results] == [False] * 4
    await calls.kv.Set(pb.SetRequest(key="users/3", value=b"secret"), metadata=admin)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await calls.kv.MultiGet(pb.MultiGetRequest(keys=keys), metadata=write)
    assert refused.value.code() == DENIED
    assert "keys[2], key 'users/3'" in (refused.value.details() or "")
    assert "the whole MultiGet is refused" in (refused.value.details() or "")
    assert b"secret" not in (refused.value.details() or "").encode()


async def test_scan_and_watch_need_a_prefix_within_the_tokens(secured: tuple[Node, Calls]) -> None:
    _, calls = secured
    read = bearer(calls.secrets["read-orders"])
    # A prefix under one of the token's prefixes is within them; a shorter one is not.
    for prefix, code in (("orders/", OK), ("orders/2026/", OK), ("orders", DENIED), ("", DENIED), ("o", DENIED)):
        assert (await calls.code("Scan", prefix, read))[0] == code, prefix
        assert (await calls.code("Watch", prefix, read))[0] == code, prefix


async def test_health_stays_open_and_reflection_needs_a_valid_token(secured: tuple[Node, Calls]) -> None:
    node, calls = secured
    async with grpc.aio.insecure_channel(node.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def services(metadata: Any) -> list[str]:
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            names: list[str] = []
            async for answer in reflection.ServerReflectionInfo(iter([request]), metadata=metadata, timeout=10):
                names += [s.name for s in answer.list_services_response.service]
            return names

        for metadata in ((), (("authorization", "Bearer wrong"),)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await services(metadata)
            assert refused.value.code() == UNAUTHENTICATED
        assert "fluxkv.v1.KV" in await services(bearer(calls.secrets["read-orders"]))


async def test_metrics_count_refusals_by_reason_and_token_and_calls_by_token(secured: tuple[Node, Calls]) -> None:
    node, calls = secured
    read = bearer(calls.secrets["read-orders"])
    await calls.code("Get", INSIDE, read)
    await calls.code("Get", INSIDE, read)
    await calls.code("Set", INSIDE, read)  # role
    await calls.code("Get", OUTSIDE, read)  # prefix
    await calls.code("Get", OUTSIDE, read)
    await calls.code("Get", INSIDE, ())  # no_token
    await calls.code("Get", INSIDE, (("authorization", "Token x"),))  # not_bearer
    await calls.code("Get", INSIDE, (("authorization", "Bearer x"),))  # unknown_token
    assert node.admin is not None
    answer = await admin_get(node.admin.port, "/metrics", calls.secrets["admin-all"])
    assert answer.status == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }

    def refused(reason: str, token: str = "") -> float:
        return samples[("fluxkv_auth_refused_total", (("reason", reason), ("token", token)))]

    assert refused("role", "read-orders") == 1
    assert refused("prefix", "read-orders") == 2
    # /metrics above was asked for with a token: only the calls count here.
    assert (refused("no_token"), refused("not_bearer"), refused("unknown_token")) == (1, 1, 1)
    assert samples[("fluxkv_auth_accepted_total", (("token", "read-orders"),))] == 5
    assert samples[("fluxkv_auth_accepted_total", (("token", "write-all"),))] == 0
    assert samples[("fluxkv_auth_tokens", ())] == len(TOKENS)
    assert not any(calls.secrets[t] in answer.text for t in TOKENS)


async def admin_get(port: int, target: str, secret: str | None = None) -> Answer:
    return await http_get(port, target, {"Authorization": f"Bearer {secret}"} if secret is not None else None)


async def test_admin_port_metrics_need_a_token_and_profiles_an_admin_token(tmp_path: Path) -> None:
    secrets = write_tokens(tmp_path / "tokens.toml", TOKENS)
    async with running_node(auth_tokens_file=str(tmp_path / "tokens.toml"), pprof_enabled=True) as (node, _):
        assert node.admin is not None
        port = node.admin.port
        for page in ("/healthz", "/readyz"):  # probes need no token
            assert (await admin_get(port, page)).status == 200
        for secret in (None, "not-a-token"):
            answer = await admin_get(port, "/metrics", secret)
            assert answer.status == 401
            assert answer.headers["www-authenticate"].startswith("Bearer")
            assert "not-a-token" not in answer.text
        metrics = await admin_get(port, "/metrics", secrets["read-orders"])
        assert metrics.status == 200 and "fluxkv_keys" in metrics.text
        for page in ("/debug/pprof/", "/debug/pprof/profile?seconds=0"):
            assert (await admin_get(port, page)).status == 401
            for token in ("read-all", "write-all"):
                answer = await admin_get(port, page, secrets[token])
                assert answer.status == 403
                assert f"token {token!r} (role {TOKENS[token][0]}) may not call /debug/pprof/" in answer.text
        assert (await admin_get(port, "/debug/pprof/", secrets["admin-orders"])).status == 200
        # Bad parameters answer 400 only once the token is let through: the page runs behind the check.
        assert (await admin_get(port, "/debug/pprof/profile?seconds=0", secrets["admin-all"])).status == 400
        refused = (await admin_get(port, "/metrics", secrets["admin-all"])).text
    assert 'fluxkv_auth_refused_total{reason="role",token="read-all"} 2' in refused
    assert 'fluxkv_auth_refused_total{reason="no_token",token=""} 3' in refused


async def test_without_a_tokens_file_nothing_is_checked_or_wrapped() -> None:
    async with running_node(pprof_enabled=True) as (node, kv):
        await kv.Set(pb.SetRequest(key="users/1", value=b"v"))
        assert node.auth is None
        info = await kv.Info(pb.InfoRequest())
        auth = next(s for s in info.subsystems if s.name == "auth")
        assert (auth.state, auth.detail) == ("disabled", "FLUX_AUTH_TOKENS_FILE is empty: calls need no token")
        assert node.admin is not None
        assert (await admin_get(node.admin.port, "/metrics")).status == 200
        assert (await admin_get(node.admin.port, "/debug/pprof/")).status == 200


async def test_info_says_which_tokens_are_loaded(secured: tuple[Node, Calls]) -> None:
    _, calls = secured
    await calls.code("Set", INSIDE, bearer(calls.secrets["read-all"]))
    info = await calls.kv.Info(pb.InfoRequest(), metadata=bearer(calls.secrets["read-all"]))
    auth = next(s for s in info.subsystems if s.name == "auth")
    assert auth.state == "enabled"
    assert f"{len(TOKENS)} tokens from " in auth.detail and "read-orders" in auth.detail
    assert "1 calls refused; SIGHUP reloads" in auth.detail


async def test_a_refused_call_is_counted_with_its_status_in_the_request_metrics(secured: tuple[Node, Calls]) -> None:
    node, calls = secured
    await calls.code("Get", INSIDE, ())
    await calls.code("Set", INSIDE, bearer(calls.secrets["read-all"]))
    exposition = node.metrics.exposition().decode()
    assert 'fluxkv_requests_total{method="fluxkv.v1.KV/Get",code="UNAUTHENTICATED"} 1' in exposition
    assert 'fluxkv_requests_total{method="fluxkv.v1.KV/Set",code="PERMISSION_DENIED"} 1' in exposition


def test_a_method_without_a_rule_cannot_be_guarded(tmp_path: Path) -> None:
    write_tokens(tmp_path / "tokens.toml", {})
    auth = NodeAuth(str(tmp_path / "tokens.toml"))

    async def handler(request: object) -> object:
        return request

    with pytest.raises(ValueError, match=r"fluxkv\.v1\.KV/Compact has no rule"):
        auth.guard({"fluxkv.v1.KV": {"Compact": handler}})
