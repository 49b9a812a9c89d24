"""The admin HTTP port (FLUX_ADMIN_PORT): its pages, liveness and readiness
through start-up and shutdown (with etcd too), `off`, and the workers' ports;
the rules of AdminServer itself (GET only, no bodies, slashes, failing pages)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from http import HTTPStatus

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.private_servers import EtcdServer
from fluxkv import config
from fluxkv.obs import http_server
from fluxkv.obs.admin import AdminServer, Page, Request, Response, text
from fluxkv.proto import kv_pb2 as pb
from fluxkv.server import workers
from tests.conftest import (
    http_get,
    http_raw,
    listening_ports,
    node_whose_writes_wait,
    running_node,
    server_process,
    writes_waiting,
)

ADMIN_ON = r"admin on http://127\.0\.0\.1:(\d+)/"


# -- settings ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "port"),
    [
        ({}, 6060),
        ({"FLUX_ADMIN_PORT": "0"}, 0),
        ({"FLUX_ADMIN_PORT": "OFF"}, None),
        ({"FLUX_PPROF_PORT": "7070"}, 7070),  # Flux-KV's name
        ({"FLUX_ADMIN_PORT": "8080", "FLUX_PPROF_PORT": "7070"}, 8080),
    ],
)
def test_admin_port_setting(env: dict[str, str], port: int | None) -> None:
    assert config.load({}, env).admin_port == port
    assert config.unknown_variables(env) == []


def test_bad_admin_port_names_the_variable_it_came_from() -> None:
    with pytest.raises(config.ConfigError, match="invalid FLUX_PPROF_PORT: expected a port from 0 to 65535 or off"):
        config.load({}, {"FLUX_PPROF_PORT": "pprof"})


@pytest.mark.parametrize(("port", "second"), [(6060, 6061), (0, 0), (None, None)])
def test_worker_i_serves_admin_port_plus_i(port: int | None, second: int | None) -> None:
    env = workers.worker_environment(config.Settings(workers=2, admin_port=port), 1)
    assert config.load({}, env).admin_port == second


# -- the server ----------------------------------------------------------------


async def _hello(request: Request) -> Response:
    return text(HTTPStatus.OK, f"hello from {request.url.path}")


async def _broken(request: Request) -> Response:
    raise KeyError("secret")


@asynccontextmanager
async def admin_server() -> AsyncIterator[int]:
    """An AdminServer on a free port with pages /a, /b/ and /broken: its port."""
    pages = {"/a": Page(_hello, "a"), "/b/": Page(_hello, "b"), "/broken": Page(_broken, "fails")}
    server = AdminServer("127.0.0.1", 0, pages)
    await server.start()
    try:
        yield server.port
    finally:
        await server.stop()


async def test_a_path_answers_with_or_without_its_trailing_slash() -> None:
    async with admin_server() as port:
        for path in ("/a", "/a/", "/b/", "/b"):
            answer = await http_get(port, path)
            assert (answer.status, answer.text) == (200, f"hello from {path}\n")
            assert answer.headers["content-type"] == "text/plain; charset=utf-8"
        index = await http_get(port, "/")
        assert index.text.splitlines()[2:] == ["/        this list", "/a       a", "/b/      b", "/broken  fails"]
        assert (await http_get(port, "/c")).text == "no page at /c; see /\n"


@pytest.mark.parametrize("method", ["POST", "HEAD", "DELETE", "OPTIONS"])
async def test_only_get_is_served(method: str) -> None:
    async with admin_server() as port:
        answer = await http_raw(port, f"{method} /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert answer.status == 405
        assert answer.headers["allow"] == "GET"
        if method != "HEAD":
            assert answer.text == f"{method} is not supported; use GET\n"


@pytest.mark.parametrize(
    "body_headers", ["Content-Length: 5\r\n\r\nhello", "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"]
)
async def test_a_request_body_is_refused(body_headers: str) -> None:
    async with admin_server() as port:
        answer = await http_raw(port, f"GET /a HTTP/1.1\r\nHost: x\r\n{body_headers}".encode())
        assert (answer.status, answer.text) == (400, "a request body is not accepted\n")
        assert answer.headers["connection"] == "close"


async def test_a_failing_page_answers_500_naming_the_path_and_the_exception(caplog: pytest.LogCaptureFixture) -> None:
    async with admin_server() as port:
        with caplog.at_level(logging.ERROR, logger="fluxkv.admin"):
            answer = await http_get(port, "/broken")
        assert (answer.status, answer.text) == (500, "/broken failed: KeyError\n")
        assert "secret" not in answer.text
        assert [r.getMessage() for r in caplog.records] == ["admin page /broken failed"]
        assert (await http_get(port, "/a")).status == 200  # the server goes on


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
        b"GET /a HTTP/1.1\r\n" + b"X-A: b\r\n" * 10_000 + b"\r\n",
        b"GET /a HTTP/1.1\r\nX-A: " + b"b" * 1_000_000 + b"\r\n\r\n",
    ],
    ids=["line", "headers", "header"],
)
async def test_a_request_line_and_headers_over_the_bound_answer_431(request_bytes: bytes) -> None:
    async with admin_server() as port:
        answer = await http_raw(port, request_bytes)
        assert (answer.status, answer.text) == (431, "request line and headers over 32768 bytes\n")
        assert (await http_get(port, "/a/")).status == 200


@pytest.mark.parametrize("sent", [b"", b"GET /a HTTP/1.1\r\nHost: x\r\n"])
async def test_a_request_not_received_in_time_answers_408(monkeypatch: pytest.MonkeyPatch, sent: bytes) -> None:
    monkeypatch.setattr(http_server, "HEAD_TIMEOUT_S", 0.5)
    async with admin_server() as port:
        answer = await http_raw(port, sent)
        assert (answer.status, answer.text) == (408, "no complete request line and headers within 0.5 s\n")


async def test_a_connection_serves_request_after_request() -> None:
    async with admin_server() as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        answers = [await client.get(path) for path in ("/a", "/b/", "/c", "/a")]
        assert [a.status_code for a in answers] == [200, 200, 404, 200]
        assert len({a.extensions["network_stream"].get_extra_info("client_addr") for a in answers}) == 1


# -- pages -------------------------------------------------------------------


@pytest.mark.usefixtures("grpc_server")
async def test_index_health_and_unknown_pages() -> None:
    async with running_node() as (node, _):
        assert node.admin is not None
        port = node.admin.port
        index = await http_get(port, "/")
        assert index.status == 200
        for page in ("/metrics", "/healthz", "/readyz"):
            assert page in index.text
        assert "/debug/pprof/" not in index.text  # profiling is off by default
        health = await http_get(port, "/healthz")
        assert (health.status, health.text) == (200, "ok\n")
        ready = await http_get(port, "/readyz")
        assert (ready.status, ready.text) == (200, f"ready: serving on {node.address}\n")
        missing = await http_get(port, "/debug/pprof/")
        assert missing.status == 404 and "no page at /debug/pprof/; see /" in missing.text


@pytest.mark.usefixtures("grpc_server")
async def test_not_ready_and_not_serving_from_the_start_of_shutdown_while_calls_drain() -> None:
    # The next write waits for room in the CDC queue: an in-flight call that holds the shutdown back.
    async with node_whose_writes_wait(shutdown_grace_s=60.0) as (node, kv):
        assert node.admin is not None
        port = node.admin.port
        blocked = kv.Set(pb.SetRequest(key="late", value=b"v"), timeout=60)
        await writes_waiting(node, 1)
        assert (await http_get(port, "/readyz")).status == 200
        async with grpc.aio.insecure_channel(node.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await health.read()).status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.create_task(node.stop())  # runs before the admin server sees the next request
            ready = await http_get(port, "/readyz")
            assert (ready.status, ready.text) == (503, "not ready: shutting down\n")
            assert (await health.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            health.cancel()
        assert (await http_get(port, "/healthz")).status == 200  # alive: still draining
        assert not stopping.done()
        blocked.cancel()
        assert await blocked.code() == grpc.StatusCode.CANCELLED
        await asyncio.wait_for(stopping, 30)
        with pytest.raises(httpx.ConnectError):
            await http_get(port, "/healthz")


# -- processes -----------------------------------------------------------------


@pytest.mark.etcd
@pytest.mark.usefixtures("grpc_server")
def test_ready_only_once_registered_in_etcd() -> None:
    etcd = EtcdServer()  # not started yet: the node starts unregistered
    try:
        env = {"FLUX_ETCD_ENDPOINTS": etcd.endpoint, "FLUX_ETCD_TIMEOUT_S": "1", "FLUX_ETCD_LEASE_TTL_S": "2"}
        with server_process(env=env) as node:
            port = int(node.wait_for(ADMIN_ON)[0].group(1))
            assert asyncio.run(http_get(port, "/healthz")).status == 200
            ready = asyncio.run(http_get(port, "/readyz"))
            assert ready.status == 503
            assert ready.text == "not ready: not registered in etcd (unregistered); retrying\n"
            etcd.start()
            node.wait_for("registered in etcd as")
            assert asyncio.run(http_get(port, "/readyz")).status == 200
            assert node.stop() == 0
            assert "deregistered from etcd" in node.log
    finally:
        etcd.close()


@pytest.mark.usefixtures("grpc_server")
def test_off_opens_no_admin_port() -> None:
    with server_process(env={"FLUX_ADMIN_PORT": "off"}) as server:
        grpc_port = int(server.address.rsplit(":", 1)[1])
        assert listening_ports(server.proc.pid) == {grpc_port}
        assert "admin on" not in server.log
        with grpc.insecure_channel(server.address) as channel:
            info = pb.InfoResponse.FromString(
                channel.unary_unary("/fluxkv.v1.KV/Info")(pb.InfoRequest().SerializeToString(), timeout=10)
            )
        admin = next(s for s in info.subsystems if s.name == "admin")
        assert (admin.state, admin.detail) == (
            "disabled",
            "FLUX_ADMIN_PORT is off: no metrics, health, readiness or profiling endpoint",
        )
        assert server.stop() == 0


@pytest.mark.usefixtures("grpc_server")
def test_each_worker_serves_its_own_admin_port() -> None:
    with server_process("--workers", "2") as parent:
        ports = {int(m.group(1)) for m in parent.wait_for(ADMIN_ON, count=2)}
        assert len(ports) == 2
        for port in ports:
            assert asyncio.run(http_get(port, "/healthz")).status == 200
            parent.wait_for("serving on", count=2)
            assert asyncio.run(http_get(port, "/readyz")).status == 200
        assert parent.stop() == 0
