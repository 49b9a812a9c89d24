"""The `fluxkv` command-line client, run as a real process against a real fluxkv-server."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from collections import Counter

import grpc
import pytest

from fluxkv.proto import kv_pb2, kv_pb2_grpc
from tests.conftest import ROOT, ServerProcess

CLI = str(ROOT / "cmd" / "fluxkv")


def fluxkv(addr: str, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        [sys.executable, CLI, "--addr", addr, *args], input=stdin, capture_output=True, timeout=60, check=False
    )
    assert b"Traceback" not in result.stderr, result.stderr.decode()
    return result


def out(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stdout.decode()


def err(result: subprocess.CompletedProcess[bytes]) -> str:
    return result.stderr.decode()


def revision(result: subprocess.CompletedProcess[bytes]) -> int:
    match = re.fullmatch(r"OK revision=(\d+)( \(created\))?\n", out(result))
    assert match, out(result)
    return int(match.group(1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_set_then_get(server: ServerProcess) -> None:
    first = fluxkv(server.address, "set", "greeting", "hello")
    assert first.returncode == 0, err(first)
    assert re.fullmatch(r"OK revision=\d+ \(created\)\n", out(first))

    second = fluxkv(server.address, "set", "greeting", "hello, world")
    assert second.returncode == 0, err(second)
    assert re.fullmatch(r"OK revision=\d+\n", out(second))
    assert revision(second) > revision(first)

    got = fluxkv(server.address, "get", "greeting")
    assert (got.returncode, got.stdout, got.stderr) == (0, b"hello, world\n", b"")


def test_get_missing_key(server: ServerProcess) -> None:
    got = fluxkv(server.address, "get", "nothing-here")
    assert (got.returncode, got.stdout) == (1, b"")
    assert err(got) == "(not found)\n"


def test_set_with_ttl(server: ServerProcess) -> None:
    result = fluxkv(server.address, "set", "session", "abc", "--ttl-ms", "600000")
    assert result.returncode == 0, err(result)
    assert fluxkv(server.address, "get", "session").stdout == b"abc\n"
    with grpc.insecure_channel(server.address) as channel:
        answer = kv_pb2_grpc.KVStub(channel).Get(kv_pb2.GetRequest(key="session"), timeout=10)
    assert 0 < answer.ttl_ms <= 600000


def test_set_expect_revision(server: ServerProcess) -> None:
    rev = revision(fluxkv(server.address, "set", "counter", "1"))

    ok = fluxkv(server.address, "set", "counter", "2", "--expect-revision", str(rev))
    assert ok.returncode == 0, err(ok)

    stale = fluxkv(server.address, "set", "counter", "3", "--expect-revision", str(rev))
    assert stale.returncode == 1
    assert stale.stdout == b""
    assert "condition failed" in err(stale) and f"not the expected {rev}" in err(stale)

    exists = fluxkv(server.address, "set", "counter", "4", "--expect-revision", "0")
    assert exists.returncode == 1
    assert "condition failed" in err(exists)

    assert fluxkv(server.address, "get", "counter").stdout == b"2\n"


def test_delete(server: ServerProcess) -> None:
    rev = revision(fluxkv(server.address, "set", "doomed", "x"))

    wrong = fluxkv(server.address, "del", "doomed", "--expect-revision", str(rev + 100))
    assert wrong.returncode == 1
    assert "condition failed" in err(wrong)

    deleted = fluxkv(server.address, "del", "doomed", "--expect-revision", str(rev))
    assert deleted.returncode == 0, err(deleted)
    assert re.fullmatch(r"deleted revision=\d+\n", out(deleted))

    again = fluxkv(server.address, "del", "doomed")
    assert (again.returncode, out(again)) == (1, "(not found)\n")
    assert fluxkv(server.address, "get", "doomed").returncode == 1


def test_mset_then_mget(server: ServerProcess) -> None:
    written = fluxkv(server.address, "mset", "a", "1", "b", "two words")
    assert written.returncode == 0, err(written)
    lines = out(written).splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"a\tOK revision=\d+ \(created\)", lines[0])
    assert re.fullmatch(r"b\tOK revision=\d+ \(created\)", lines[1])

    read = fluxkv(server.address, "mget", "b", "missing", "a")
    assert read.returncode == 0, err(read)
    assert out(read) == "b\ttwo words\nmissing\t(not found)\na\t1\n"


def test_mset_odd_arguments_is_a_usage_error(server: ServerProcess) -> None:
    result = fluxkv(server.address, "mset", "a", "1", "b")
    assert result.returncode == 2
    assert "usage: fluxkv mset" in err(result) and "odd number" in err(result)
    assert fluxkv(server.address, "get", "a").returncode == 1  # nothing written


def test_scan_follows_the_cursor(server: ServerProcess) -> None:
    wanted = [f"page/{i:02d}" for i in range(23)]
    args = [part for key in wanted for part in (key, "v")]
    assert fluxkv(server.address, "mset", *args, "other/1", "v", "pag", "v").returncode == 0

    result = fluxkv(server.address, "scan", "--prefix", "page/", "--count", "4")
    assert result.returncode == 0, err(result)
    listed = out(result).splitlines()
    assert Counter(listed) == Counter(wanted)  # every key exactly once, over at least 6 pages

    everything = fluxkv(server.address, "scan", "--count", "3")
    assert sorted(out(everything).splitlines()) == sorted([*wanted, "other/1", "pag"])


def test_scan_values(server: ServerProcess) -> None:
    assert fluxkv(server.address, "mset", "v/a", "alpha", "v/b", "beta", "w", "omega").returncode == 0
    assert fluxkv(server.address, "set", "v/bin", "-", stdin=b"\xff\x00\nz").returncode == 0

    result = fluxkv(server.address, "scan", "--prefix", "v/", "--values", "--count", "2")
    assert result.returncode == 0, err(result)
    assert sorted(out(result).splitlines()) == ["v/a\talpha", "v/b\tbeta", "v/bin\t" + repr(b"\xff\x00\nz")]


def test_binary_value_from_stdin_round_trips(server: ServerProcess) -> None:
    data = bytes(range(256)) * 3 + b"\n\r\x00"
    written = fluxkv(server.address, "set", "blob", "-", stdin=data)
    assert written.returncode == 0, err(written)

    got = fluxkv(server.address, "get", "blob")
    assert got.returncode == 0, err(got)
    assert got.stdout == data + b"\n"

    line = fluxkv(server.address, "mget", "blob")
    assert out(line) == f"blob\t{data!r}\n"  # one line, Python's repr of the bytes


def test_info(server: ServerProcess) -> None:
    assert fluxkv(server.address, "mset", "k1", "a", "k2", "b", "k3", "c").returncode == 0
    with grpc.insecure_channel(server.address) as channel:
        node_id = kv_pb2_grpc.KVStub(channel).Info(kv_pb2.InfoRequest(), timeout=10).node_id

    result = fluxkv(server.address, "info")
    assert result.returncode == 0, err(result)
    fields = dict(line.split(": ", 1) for line in out(result).splitlines())
    assert fields["node_id"] == node_id
    assert fields["address"] == server.address
    assert fields["key_count"] == "3"
    assert fields["shards.shards"] == "256"
    assert int(fields["limits.max_key_bytes"]) > 0
    assert fields["subsystems.active_expiry.state"] == "running"


def test_invalid_request_is_exit_2_with_the_server_message(server: ServerProcess) -> None:
    result = fluxkv(server.address, "get", "")
    assert result.returncode == 2
    assert err(result) == "error: key must not be empty\n"

    result = fluxkv(server.address, "set", "k", "v", "--ttl-ms", "-1")
    assert result.returncode == 2
    assert err(result).startswith("error: ttl_ms must not be negative")


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["frobnicate"],
        ["--timeout", "0", "info"],
        ["set", "k"],
        ["set", "k", "v", "--ttl-ms", "soon"],
        ["scan", "--count", "0"],
    ],
)
def test_usage_errors(args: list[str]) -> None:
    result = fluxkv(f"127.0.0.1:{free_port()}", *args)
    assert result.returncode == 2
    assert "usage: fluxkv" in err(result)


def test_unreachable_server() -> None:
    port = free_port()
    result = fluxkv(f"127.0.0.1:{port}", "info")
    assert result.returncode == 3
    assert result.stdout == b""
    assert re.fullmatch(rf"error: cannot connect to 127\.0\.0\.1:{port} \(.+\)\n", err(result)), err(result)


def test_help_documents_exit_statuses() -> None:
    result = subprocess.run([sys.executable, CLI, "--help"], capture_output=True, timeout=60, check=False)
    assert result.returncode == 0
    for status in ("0  success", "1  a negative answer", "2  a usage error", "3  the server cannot be reached"):
        assert status in out(result)
