"""CPU profiles on the admin port (FLUX_PPROF_ENABLED): the endpoint, py-spy's
files, one profile at a time, bad requests, and the node's start and stop."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from fluxkv import config
from fluxkv.obs import profiling
from fluxkv.proto import kv_pb2, kv_pb2_grpc
from fluxkv.server import workers
from fluxkv.server.node import Node
from tests.conftest import Answer, http_get, http_raw, listening_ports, running_node, server_process

PROFILING_ON = re.compile(r"profiling on (http://\S+/debug/pprof/) \(py-spy\)")
ADMIN_ON = re.compile(r"admin on http://127\.0\.0\.1:(\d+)/")
TIMEOUT_S = 30


@asynccontextmanager
async def pprof_node() -> AsyncIterator[tuple[Node, int, kv_pb2_grpc.KVStub]]:
    """A node in this process with profiling on, its admin port a free one: the node, that port, a stub."""
    async with running_node(pprof_enabled=True) as (node, kv):
        assert node.admin is not None
        yield node, node.admin.port, kv


async def profile_under_load(port: int, kv: kv_pb2_grpc.KVStub, target: str) -> tuple[Answer, int]:
    """Request a profile while writing to the node (so py-spy has samples); also
    returns the writes done before the answer, which needs a free event loop."""
    request = asyncio.create_task(http_get(port, target))
    writes = 0
    while not request.done():
        await kv.Set(kv_pb2.SetRequest(key=f"k{writes % 100}", value=b"v"), timeout=TIMEOUT_S)
        writes += 1
    return await request, writes


async def wait_recording(node: Node) -> None:
    assert node.profiler is not None
    async with asyncio.timeout(TIMEOUT_S):
        while not node.profiler.recording:
            await asyncio.sleep(0.01)


async def admin_info(kv: kv_pb2_grpc.KVStub) -> kv_pb2.Subsystem:
    info = await kv.Info(kv_pb2.InfoRequest(), timeout=TIMEOUT_S)
    return next(s for s in info.subsystems if s.name == "admin")


def py_spy_children() -> list[int]:
    """py-spy processes whose parent is this process."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        if comm.startswith("py-spy") and int(fields[1]) == os.getpid():
            found.append(int(entry.name))
    return found


# -- settings ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "enabled"), [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), ("no", False)]
)
def test_enabled_is_a_boolean_setting(text: str, enabled: bool) -> None:
    assert config.load({}, {"FLUX_PPROF_ENABLED": text}).pprof_enabled is enabled


def test_invalid_boolean_names_the_setting() -> None:
    with pytest.raises(config.ConfigError, match=r"invalid FLUX_PPROF_ENABLED: expected true or false .*'maybe'"):
        config.load({}, {"FLUX_PPROF_ENABLED": "maybe"})


def test_profiling_needs_the_admin_port() -> None:
    with pytest.raises(config.ConfigError, match="FLUX_PPROF_ENABLED serves profiles on the admin port, but "):
        config.load({}, {"FLUX_PPROF_ENABLED": "true", "FLUX_ADMIN_PORT": "off"})


def test_each_worker_profiles_on_its_own_admin_port() -> None:
    env = workers.worker_environment(config.Settings(workers=2, pprof_enabled=True, admin_port=7000), 1)
    worker = config.load({}, env)
    assert (worker.pprof_enabled, worker.admin_port) == (True, 7001)


# -- the endpoint ------------------------------------------------------------


@pytest.mark.usefixtures("grpc_server")
async def test_index_lists_the_profile_endpoint_and_info_reports_it() -> None:
    async with pprof_node() as (_, port, kv):
        for path in ("/debug/pprof/", "/debug/pprof"):
            answer = await http_get(port, path)
            assert answer.status == 200
            assert answer.headers["content-type"] == "text/plain; charset=utf-8"
            assert "/debug/pprof/profile?seconds=N&format=F" in answer.text
            assert "speedscope" in answer.text and "flamegraph" in answer.text
        line = await admin_info(kv)
        assert line.state == "running"
        assert line.detail.startswith(f"http://127.0.0.1:{port}/: ")
        assert "profiles at /debug/pprof/ with " in line.detail
        assert "0 profiles recorded" in line.detail


@pytest.mark.usefixtures("grpc_server")
async def test_speedscope_profile_while_the_node_serves() -> None:
    async with pprof_node() as (_, port, kv):
        answer, writes = await profile_under_load(port, kv, "/debug/pprof/profile?seconds=1")
        assert answer.status == 200, answer.text
        assert answer.headers["content-type"] == "application/json"
        assert re.fullmatch(
            r'attachment; filename="fluxkv-\d+-\d{8}T\d{6}Z\.speedscope\.json"', answer.headers["content-disposition"]
        )
        doc = json.loads(answer.body)
        assert {"profiles", "shared"} <= doc.keys()
        assert doc["profiles"] and "frames" in doc["shared"]
        assert writes > 10  # the event loop kept serving while py-spy sampled
        assert "1 profiles recorded" in (await admin_info(kv)).detail


@pytest.mark.parametrize(
    ("fmt", "content_type", "starts"),
    [("flamegraph", "image/svg+xml", b"<?xml"), ("raw", "text/plain; charset=utf-8", b"")],
)
@pytest.mark.usefixtures("grpc_server")
async def test_flamegraph_and_raw_formats(fmt: str, content_type: str, starts: bytes) -> None:
    async with pprof_node() as (_, port, kv):
        answer, _ = await profile_under_load(port, kv, f"/debug/pprof/profile?seconds=1&format={fmt}")
        assert answer.status == 200, answer.text
        assert answer.headers["content-type"] == content_type
        assert "content-disposition" not in answer.headers
        assert answer.body.startswith(starts)
        if fmt == "flamegraph":
            assert b"<svg" in answer.body
        else:  # collapsed stacks: "frame;frame;... count"
            assert re.search(rb"^\S.* \d+$", answer.body, re.MULTILINE)


@pytest.mark.usefixtures("grpc_server")
async def test_one_profile_at_a_time() -> None:
    async with pprof_node() as (node, port, kv):
        first = asyncio.create_task(http_get(port, "/debug/pprof/profile?seconds=2&format=raw"))
        await wait_recording(node)
        second = await http_get(port, "/debug/pprof/profile?seconds=1")
        assert second.status == 409
        assert "another profile is being recorded (one at a time)" in second.text
        assert 1 <= int(second.headers["retry-after"]) <= 2
        assert "one recording now" in (await admin_info(kv)).detail
        assert (await first).status == 200
        assert "1 profiles recorded, 1 refused while another was recording" in (await admin_info(kv)).detail


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("seconds=0", "seconds must be an integer from 1 to 300, got '0'"),
        ("seconds=301", "seconds must be an integer from 1 to 300, got '301'"),
        ("seconds=1.5", "seconds must be an integer from 1 to 300, got '1.5'"),
        ("seconds=", "seconds must be an integer from 1 to 300, got ''"),
        ("seconds=" + "9" * 5000, "seconds must be an integer from 1 to 300"),
        ("format=pdf", "format must be one of speedscope, flamegraph, raw, got 'pdf'"),
        ("second=5", "unknown parameter 'second'; expected seconds and format"),
        ("seconds=1&seconds=2", "parameter 'seconds' given more than once"),
        ("seconds", "bad query string 'seconds'"),
    ],
)
@pytest.mark.usefixtures("grpc_server")
async def test_bad_parameters_answer_400(query: str, message: str) -> None:
    async with pprof_node() as (node, port, _):
        answer = await http_get(port, f"/debug/pprof/profile?{query}")
        assert answer.status == 400
        assert message in answer.text
        assert node.profiler is not None and node.profiler.profiles == 0


@pytest.mark.parametrize(
    ("request_bytes", "status", "message"),
    [
        (b"GET /debug/pprof/heap HTTP/1.1\r\n\r\n", 404, "no page at /debug/pprof/heap; see /"),
        (b"GET /debug HTTP/1.0\r\n\r\n", 404, "no page at /debug; see /"),
        (b"POST /debug/pprof/ HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405, "POST is not supported; use GET"),
        (b"GET /debug/pprof/ HTTP/1.1\r\nno colon here\r\n\r\n", 400, "Invalid HTTP request received."),
        (b"GET /debug/pprof/ HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello", 400, "a request body is not accepted"),
    ],
)
@pytest.mark.usefixtures("grpc_server")
async def test_bad_requests_are_answered(request_bytes: bytes, status: int, message: str) -> None:
    async with pprof_node() as (_, port, _):
        answer = await http_raw(port, request_bytes)
        assert answer.status == status
        assert message in answer.text


@pytest.mark.usefixtures("grpc_server")
async def test_missing_py_spy_answers_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(profiling, "find_py_spy", lambda: None)
    async with pprof_node() as (_, port, _):
        answer = await http_get(port, "/debug/pprof/profile?seconds=1")
        assert answer.status == 503
        assert "py-spy is not installed" in answer.text and "fluxkv[profile]" in answer.text


@pytest.mark.usefixtures("grpc_server")
async def test_py_spy_failure_answers_500_with_its_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    refusing = tmp_path / "py-spy"
    refusing.write_text("#!/bin/sh\necho 'py-spy> Sampling'\necho 'Error: Permission Denied' >&2\nexit 1\n")
    refusing.chmod(0o755)
    monkeypatch.setattr(profiling, "find_py_spy", lambda: str(refusing))
    async with pprof_node() as (node, port, _):
        answer = await http_get(port, "/debug/pprof/profile?seconds=1")
        assert answer.status == 500
        assert answer.text == "py-spy failed (exit status 1): Error: Permission Denied\n"
        assert node.profiler is not None and not node.profiler.recording


# -- start and stop ----------------------------------------------------------


@pytest.mark.usefixtures("grpc_server")
async def test_stop_ends_a_profile_in_progress() -> None:
    async with pprof_node() as (node, port, _):
        request = asyncio.create_task(http_get(port, "/debug/pprof/profile?seconds=300"))
        await wait_recording(node)
        assert py_spy_children()
        assert node.admin is not None
        await node.admin.stop()  # as Node.stop does
        answer = await request
        assert (answer.status, answer.text) == (503, "/debug/pprof/profile was cut short: the node is stopping\n")
        assert not py_spy_children()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)


async def test_a_taken_port_stops_the_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = Node(config.Settings(port=0, pprof_enabled=True, admin_port=port))
        with pytest.raises(OSError, match=f"cannot listen for the admin port on 127.0.0.1:{port}"):
            await node.start()
    assert not node.address  # the admin port is taken first: gRPC never listened


@pytest.mark.usefixtures("grpc_server")
def test_disabled_by_default() -> None:
    with server_process() as server:
        match = ADMIN_ON.search(server.log)
        assert match, server.log
        admin_port = int(match.group(1))
        grpc_port = int(server.address.rsplit(":", 1)[1])
        assert listening_ports(server.proc.pid) == {grpc_port, admin_port}
        assert "profiling on" not in server.log
        answer = asyncio.run(http_get(admin_port, "/debug/pprof/"))
        assert answer.status == 404
        assert server.stop() == 0


@pytest.mark.usefixtures("grpc_server")
def test_server_process_profiles_itself() -> None:
    with server_process(env={"FLUX_PPROF_ENABLED": "yes"}) as server:
        match = PROFILING_ON.search(server.log)
        assert match, server.log
        url = match.group(1)
        admin_port = int(url.rsplit(":", 1)[1].split("/")[0])
        grpc_port = int(server.address.rsplit(":", 1)[1])
        assert listening_ports(server.proc.pid) == {grpc_port, admin_port}
        with urllib.request.urlopen(url + "profile?seconds=1", timeout=TIMEOUT_S) as answer:
            assert answer.headers["Content-Type"] == "application/json"
            assert {"profiles", "shared"} <= json.load(answer).keys()
        assert server.stop() == 0
