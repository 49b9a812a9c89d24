"""TLS to etcd and etcd's own auth, against real etcd servers started with TLS (a client certificate required) and
with auth enabled (etcdctl user add, auth enable): nodes register and clients discover them, a wrong CA, a missing
client certificate and a wrong password fail clearly, and tokens that etcd refuses (expired, or issued before a
change of its users) are renewed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import aclosing
from pathlib import Path

import grpc
import pytest

from deploy.private_servers import EtcdServer, EtcdTLS
from fluxkv import TLS, EtcdNodes, KeyValue, SyncClient
from fluxkv.cluster.etcd_client import EtcdAuthFailed, EtcdClient, EtcdError, EtcdUnavailable
from fluxkv.proto import etcd_api_pb2, etcd_api_pb2_grpc, kv_pb2_grpc
from fluxkv.proto import kv_pb2 as pb
from tests.conftest import ROOT, Certificates, eventually, running_node, server_process

TIMEOUT_S = 5.0
WAIT_S = 10.0
ROOT_PASSWORD = "root-secret-4711"
USER = "fluxkv"
PASSWORD = "node-secret-0815"  # the tests check that no log shows it
USERS_PREFIX = "/fluxkv-test/"  # what USER may read and write; each test's prefix is below it
JWT_TTL_S = 2  # the life of expiring_etcd_server's tokens


@pytest.fixture
def prefix() -> str:
    return f"{USERS_PREFIX}{uuid.uuid4().hex[:8]}/"


@pytest.fixture
def tls_etcd_server(certificates: Certificates) -> Iterator[EtcdServer]:
    """An etcd that serves TLS only and asks every client for a certificate signed by the session's CA."""
    tls = EtcdTLS(certificates.cert, certificates.key, certificates.ca, client_cert_auth=True)
    with EtcdServer(tls=tls) as server:
        yield server


def _with_auth(server: EtcdServer) -> EtcdServer:
    server.add_user(USER, PASSWORD, USERS_PREFIX)
    server.enable_auth(ROOT_PASSWORD)
    return server


@pytest.fixture
def auth_etcd_server() -> Iterator[EtcdServer]:
    """An etcd with auth enabled, its default (simple) tokens, and USER, who may use USERS_PREFIX."""
    with EtcdServer() as server:
        yield _with_auth(server)


@pytest.fixture
def expiring_etcd_server() -> Iterator[EtcdServer]:
    """The same with JWT tokens that expire JWT_TTL_S after they were issued, used or not."""
    with EtcdServer(jwt_ttl_s=JWT_TTL_S) as server:
        yield _with_auth(server)


@pytest.fixture
def jwt_etcd_server() -> Iterator[EtcdServer]:
    """The same with JWT tokens that live for the test, but, as a JWT holds the revision of etcd's users and roles
    it was issued at, are refused after a change of them (simple tokens are not)."""
    with EtcdServer(jwt_ttl_s=600) as server:
        yield _with_auth(server)


@pytest.fixture
def secure_etcd_server(certificates: Certificates) -> Iterator[EtcdServer]:
    """Both: TLS with client certificates, and auth."""
    tls = EtcdTLS(certificates.cert, certificates.key, certificates.ca, client_cert_auth=True)
    with EtcdServer(tls=tls) as server:
        yield _with_auth(server)


@pytest.fixture
async def root(auth_etcd_server: EtcdServer) -> AsyncIterator[EtcdClient]:
    """etcd's administrator, to look at what the nodes wrote."""
    async with EtcdClient([auth_etcd_server.endpoint], TIMEOUT_S, username="root", password=ROOT_PASSWORD) as c:
        yield c


def node_env(server: EtcdServer, prefix: str, **extra: str) -> dict[str, str]:
    return {
        "FLUX_ETCD_ENDPOINTS": server.url,
        "FLUX_ETCD_PREFIX": prefix,
        "FLUX_ETCD_LEASE_TTL_S": "2",
        "FLUX_ETCD_TIMEOUT_S": "2",
        **extra,
    }


def tls_env(certificates: Certificates, ca: str | None = None) -> dict[str, str]:
    """A node's settings for the TLS etcd: the CA to verify it with (the session's unless `ca`), and a client
    certificate."""
    return {
        "FLUX_ETCD_CA_FILE": ca or certificates.ca,
        "FLUX_ETCD_CERT_FILE": certificates.client_cert,
        "FLUX_ETCD_KEY_FILE": certificates.client_key,
    }


AUTH_ENV = {"FLUX_ETCD_USERNAME": USER, "FLUX_ETCD_PASSWORD": PASSWORD}


async def etcd_line(address: str) -> pb.Subsystem:
    """The node's etcd subsystem, from its Info."""
    async with grpc.aio.insecure_channel(address) as channel:
        info = await kv_pb2_grpc.KVStub(channel).Info(pb.InfoRequest(), timeout=TIMEOUT_S)  # type: ignore[no-untyped-call]
    return next(s for s in info.subsystems if s.name == "etcd")


async def authenticate(server: EtcdServer) -> str:
    """A token of USER's, from etcd's Auth/Authenticate."""
    async with grpc.aio.insecure_channel(server.endpoint) as channel:
        auth = etcd_api_pb2_grpc.AuthStub(channel)  # type: ignore[no-untyped-call]  # generated code has no annotations
        answer = await auth.Authenticate(etcd_api_pb2.AuthenticateRequest(name=USER, password=PASSWORD))
    return str(answer.token)


async def refused(server: EtcdServer, token: str) -> bool:
    """Whether etcd refuses `token` now (a JWT's use does not extend its life)."""
    async with grpc.aio.insecure_channel(server.endpoint) as channel:
        kv = etcd_api_pb2_grpc.KVStub(channel)  # type: ignore[no-untyped-call]
        try:
            await kv.Range(etcd_api_pb2.RangeRequest(key=USERS_PREFIX.encode()), metadata=(("token", token),))
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
            return True
    return False


# -- TLS ---------------------------------------------------------------------------


async def test_a_node_registers_and_a_client_discovers_it_over_mutual_tls(
    grpc_server: str, tls_etcd_server: EtcdServer, certificates: Certificates, prefix: str
) -> None:
    assert tls_etcd_server.url.startswith("https://")
    with server_process(env={**node_env(tls_etcd_server, prefix), **tls_env(certificates)}) as node:
        assert "(TLS, no etcd user)" in node.log
        client_tls = TLS(certificates.ca, certificates.client_cert, certificates.client_key)
        async with EtcdNodes([tls_etcd_server.url], prefix, tls=client_tls) as nodes:
            assert nodes.addresses == {node.address}
        line = await etcd_line(node.address)
        assert line.state == "registered" and "TLS" in line.detail


async def test_a_client_without_a_certificate_is_refused_by_an_etcd_that_asks_for_one(
    tls_etcd_server: EtcdServer, certificates: Certificates, prefix: str
) -> None:
    with pytest.raises(EtcdUnavailable, match=r"the TLS handshake failed; check the CA certificates .* client cert"):
        async with EtcdNodes([tls_etcd_server.url], prefix, TIMEOUT_S, tls=TLS(certificates.ca)):
            pass


async def test_a_wrong_ca_fails_clearly(
    grpc_server: str, tls_etcd_server: EtcdServer, certificates: Certificates, prefix: str
) -> None:
    other = TLS(certificates.other_ca, certificates.client_cert, certificates.client_key)
    with pytest.raises(EtcdUnavailable, match=r"CERTIFICATE_VERIFY_FAILED.*the TLS handshake failed"):
        async with EtcdNodes([tls_etcd_server.url], prefix, TIMEOUT_S, tls=other):
            pass
    env = {**node_env(tls_etcd_server, prefix), **tls_env(certificates, certificates.other_ca)}
    with pytest.raises(RuntimeError, match="did not start") as failed:
        with server_process(env={**env, "FLUX_ETCD_AT_START": "fail"}):
            pass
    assert "etcd unreachable at start and FLUX_ETCD_AT_START=fail" in str(failed.value)
    assert "CERTIFICATE_VERIFY_FAILED" in str(failed.value) and "the TLS handshake failed" in str(failed.value)


def test_plain_text_endpoints_with_a_ca_are_a_configuration_error(
    grpc_server: str, certificates: Certificates, prefix: str
) -> None:
    env = {"FLUX_ETCD_ENDPOINTS": "http://127.0.0.1:2379", "FLUX_ETCD_CA_FILE": certificates.ca}
    with pytest.raises(RuntimeError, match="did not start") as failed:
        with server_process(env=env):
            pass
    assert "FLUX_ETCD_ENDPOINTS names plain-text endpoints (http://127.0.0.1:2379)" in str(failed.value)


# -- etcd's auth ---------------------------------------------------------------------


async def test_a_node_registers_and_a_client_discovers_it_as_etcd_users(
    grpc_server: str, auth_etcd_server: EtcdServer, root: EtcdClient, prefix: str
) -> None:
    with server_process(env={**node_env(auth_etcd_server, prefix), **AUTH_ENV}) as node:
        pairs, _ = await root.get_prefix(prefix)
        assert pairs == [(prefix + node.address, node.address)]
        async with EtcdNodes([auth_etcd_server.endpoint], prefix, username=USER, password=PASSWORD) as nodes:
            assert nodes.addresses == {node.address}
        line = await etcd_line(node.address)
        assert line.state == "registered" and f"user {USER!r}, 1 tokens from etcd" in line.detail
        assert node.stop() == 0
    assert "deregistered from etcd" in node.log
    assert PASSWORD not in node.log


async def test_a_node_counts_its_tokens(grpc_server: str, auth_etcd_server: EtcdServer, prefix: str) -> None:
    settings = {"etcd_endpoints": (auth_etcd_server.endpoint,), "etcd_prefix": prefix}
    async with running_node(**settings, etcd_username=USER, etcd_password=PASSWORD) as (node, _):
        assert b"\nfluxkv_etcd_authentications_total 1\n" in node.metrics.exposition()


async def test_a_client_without_a_user_is_told_that_etcd_wants_one(auth_etcd_server: EtcdServer, prefix: str) -> None:
    with pytest.raises(EtcdError, match=r"user name is empty \(etcd's auth is enabled: give a username and password\)"):
        async with EtcdNodes([auth_etcd_server.endpoint], prefix, TIMEOUT_S):
            pass


async def test_a_wrong_password_fails_clearly(grpc_server: str, auth_etcd_server: EtcdServer, prefix: str) -> None:
    wrong = "not-the-password"
    with pytest.raises(EtcdAuthFailed, match=f"refused user {USER!r} and its password: .*authentication failed"):
        async with EtcdNodes([auth_etcd_server.endpoint], prefix, TIMEOUT_S, username=USER, password=wrong):
            pass
    env = {**node_env(auth_etcd_server, prefix), "FLUX_ETCD_USERNAME": USER, "FLUX_ETCD_PASSWORD": wrong}
    with pytest.raises(RuntimeError, match="did not start") as failed:
        with server_process(env={**env, "FLUX_ETCD_AT_START": "fail"}):
            pass
    message = str(failed.value)
    assert f"etcd refused FLUX_ETCD_USERNAME {USER!r} and its FLUX_ETCD_PASSWORD at start and " in message
    assert "FLUX_ETCD_AT_START=fail" in message and "authentication failed" in message
    assert wrong not in message


async def test_a_node_refused_by_etcd_says_so_and_registers_once_etcd_knows_its_user(
    grpc_server: str, auth_etcd_server: EtcdServer, root: EtcdClient, prefix: str
) -> None:
    late, password = "late-user", "late-secret-2024"
    env = {**node_env(auth_etcd_server, prefix), "FLUX_ETCD_USERNAME": late, "FLUX_ETCD_PASSWORD": password}
    with server_process(env=env) as node:
        assert f"etcd refused FLUX_ETCD_USERNAME {late!r} and its FLUX_ETCD_PASSWORD at start" in node.log
        line = await etcd_line(node.address)
        assert line.state == "auth_failed", line
        assert f"etcd refused FLUX_ETCD_USERNAME {late!r} and its FLUX_ETCD_PASSWORD" in line.detail
        await asyncio.to_thread(auth_etcd_server.add_user, late, password, prefix)
        await asyncio.to_thread(node.wait_for, f"registered in etcd as {prefix}{node.address}")
        assert (await etcd_line(node.address)).state == "registered"
        pairs, _ = await root.get_prefix(prefix)
        assert pairs == [(prefix + node.address, node.address)]
    assert password not in node.log


async def test_a_client_with_a_user_works_before_etcd_enables_auth_and_after(
    etcd_server: EtcdServer, prefix: str
) -> None:
    """The order etcd's docs give for turning auth on: clients get their credentials first, then auth is enabled."""
    async with EtcdClient([etcd_server.endpoint], TIMEOUT_S, username=USER, password=PASSWORD) as client:
        await client.put(prefix + "a", "1")
        assert client.authentications == 0 and "etcd's auth is off" in client.describe()
        await asyncio.to_thread(_with_auth, etcd_server)
        pairs, _ = await client.get_prefix(prefix)  # refused for want of a user, then sent again with a token
        assert pairs == [(prefix + "a", "1")]
        assert client.authentications == 1 and f"user {USER!r}, 1 tokens from etcd" in client.describe()


# -- tokens that etcd refuses --------------------------------------------------------


async def test_the_client_renews_a_token_that_expired(expiring_etcd_server: EtcdServer, prefix: str) -> None:
    async with EtcdClient([expiring_etcd_server.endpoint], TIMEOUT_S, username=USER, password=PASSWORD) as client:
        await client.put(prefix + "a", "1")
        assert client.authentications == 1

        async def renewed() -> bool:
            # Every get succeeds: the one that etcd refuses for an expired token is sent again with a new one.
            pairs, _ = await client.get_prefix(prefix)
            assert pairs == [(prefix + "a", "1")]
            return client.authentications == 2

        await eventually(renewed, "the token expires and is renewed", wait_s=JWT_TTL_S + WAIT_S)


async def test_the_client_renews_its_token_for_every_kind_of_call_after_etcd_users_change(
    jwt_etcd_server: EtcdServer, prefix: str
) -> None:
    """etcd refuses a JWT issued before a change of its users or roles (etcdctl user add, here) when it checks a
    permission: each call that finds its token refused (Range, Put, LeaseRevoke of a lease with a key, and a Watch,
    whose refusal comes as its cancel reason) authenticates again and goes through."""
    endpoints = [jwt_etcd_server.endpoint]
    async with (
        EtcdClient(endpoints, TIMEOUT_S, username=USER, password=PASSWORD) as client,
        EtcdClient(endpoints, TIMEOUT_S, username="root", password=ROOT_PASSWORD) as root,
    ):
        lease = await client.lease_grant(60)
        await client.put(prefix + "leased", "v", lease=lease)
        assert client.authentications == 1
        calls: dict[str, Callable[[], Awaitable[object]]] = {
            "get": lambda: client.get_prefix(prefix),
            "put": lambda: client.put(prefix + "k", "v"),
            "lease revoke": lambda: client.lease_revoke(lease),
            "watch": lambda: _watch_one_put(client, root, prefix),
        }
        for number, (what, call) in enumerate(calls.items(), start=2):
            await asyncio.to_thread(jwt_etcd_server.add_user, f"other-{number}", "pw", "/other/")
            await call()
            assert client.authentications == number, what
        pairs, _ = await root.get_prefix(prefix)
        assert [key for key, _ in pairs] == [prefix + "k", prefix + "watched"]  # the revoke took the leased key


async def _watch_one_put(client: EtcdClient, writer: EtcdClient, prefix: str) -> None:
    revision = await writer.put(prefix + "watched", "v")
    async with aclosing(client.watch_prefix(prefix, revision)) as watch:
        async with asyncio.timeout(WAIT_S):
            [event] = await anext(watch)
    assert (event.key, event.mod_revision) == (prefix + "watched", revision)


async def test_a_node_renews_its_expired_token_to_deregister(
    grpc_server: str, expiring_etcd_server: EtcdServer, prefix: str
) -> None:
    """A node's lease keep-alives need no token, so its token expires while it runs; its shutdown still revokes
    its registration at once."""
    with server_process(env={**node_env(expiring_etcd_server, prefix), **AUTH_ENV}) as node:
        later = await authenticate(expiring_etcd_server)  # issued after the node's token, so it expires after it too
        await eventually(lambda: refused(expiring_etcd_server, later), "a token issued later expires")
        assert node.stop(signal.SIGTERM) == 0
    assert "deregistered from etcd" in node.log and "could not revoke" not in node.log
    async with EtcdClient([expiring_etcd_server.endpoint], TIMEOUT_S, username=USER, password=PASSWORD) as client:
        assert (await client.get_prefix(prefix))[0] == []  # at once, not after the lease's TTL


# -- the other programs --------------------------------------------------------------


def run(program: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """cmd/<program> ARGS with these variables added to the environment."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "cmd" / program), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


async def test_workers_the_command_line_the_benchmark_and_the_blocking_client_reach_etcd_with_tls_and_auth(
    grpc_server: str, secure_etcd_server: EtcdServer, certificates: Certificates, prefix: str, tmp_path: Path
) -> None:
    access = {**tls_env(certificates), **AUTH_ENV}
    with server_process("--workers", "2", env={**node_env(secure_etcd_server, prefix), **access}) as parent:
        await asyncio.to_thread(parent.wait_for, "registered in etcd as", 2)
        etcd = ["--etcd", secure_etcd_server.url, "--etcd-prefix", prefix]

        info = run("fluxkv", *etcd, "info", env=access)
        assert info.returncode == 0 and info.stdout.count("node_id: ") == 2, info.stderr
        # Without a token, etcd takes the client certificate's common name for a user, who may read nothing.
        anonymous = run("fluxkv", *etcd, "info", env=tls_env(certificates))
        assert anonymous.returncode == 3 and "PERMISSION_DENIED" in anonymous.stderr
        bad_file = run("fluxkv", *etcd, "info", env={**access, "FLUX_ETCD_CA_FILE": str(tmp_path / "absent.pem")})
        assert bad_file.returncode == 2 and "invalid FLUX_ETCD_CA_FILE" in bad_file.stderr

        out = tmp_path / "bench.json"
        bench = run("fluxkv-bench", *etcd, "-t", "set", "-n", "200", "-c", "4", "--json", str(out), env=access)
        assert bench.returncode == 0, bench.stderr
        record = json.loads(out.read_text())
        assert len(record["nodes"]) == 2 and (record["successes"], record["failures"]) == (200, {})
        assert PASSWORD not in out.read_text()  # etcd's credentials stay out of the result

        def blocking() -> KeyValue | None:
            client_tls = TLS(certificates.ca, certificates.client_cert, certificates.client_key)
            with SyncClient.from_etcd(
                [secure_etcd_server.url],
                prefix=prefix,
                etcd_tls=client_tls,
                etcd_username=USER,
                etcd_password=PASSWORD,
                timeout=5,
            ) as client:
                client.set("sync", b"twin")
                return client.get("sync")

        kv = await asyncio.to_thread(blocking)
        assert kv is not None and kv.value == b"twin"
        assert parent.stop() == 0
    assert parent.log.count("deregistered from etcd") == 2
    assert PASSWORD not in parent.log
