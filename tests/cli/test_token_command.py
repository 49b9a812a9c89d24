"""`fluxkv token new`: a fresh token and its table, which a real node accepts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from fluxkv.proto import kv_pb2 as pb
from fluxkv.proto import kv_pb2_grpc
from fluxkv.security import tokens
from tests.conftest import ROOT, bearer, server_process

CLI = str(ROOT / "cmd" / "fluxkv")


def token_new(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, CLI, "token", "new", *args], capture_output=True, text=True, timeout=60)


def test_token_new_prints_a_token_then_its_table() -> None:
    result = token_new("orders-service", "--role", "write", "--prefix", "orders/", "--prefix", 'say "hi"/')
    assert result.returncode == 0, result.stderr
    secret, blank, *table = result.stdout.splitlines()
    assert blank == "" and len(secret) == 43
    assert secret not in "\n".join(table)
    [token] = tokens.parse("\n".join(table).encode(), "stdout")
    assert token == tokens.Token("orders-service", tokens.digest(secret), tokens.Role.WRITE, ("orders/", 'say "hi"/'))
    assert token_new("orders-service", "--role", "write").stdout.splitlines()[0] != secret


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x"], "the following arguments are required: --role"),
        (["x", "--role", "root"], "invalid choice: 'root'"),
        (["x", "--role", "read", "--prefix", ""], "a prefix must not be empty"),
        (["", "--role", "read"], "a token's name must not be empty"),
    ],
)
def test_token_new_usage_errors(args: list[str], message: str) -> None:
    result = token_new(*args)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.usefixtures("grpc_server")
def test_a_node_accepts_the_token_of_a_table_token_new_printed(tmp_path: Path) -> None:
    printed = token_new("reader", "--role", "read", "--prefix", "orders/").stdout
    secret, _, table = printed.partition("\n\n")
    (tmp_path / "tokens.toml").write_text(table)
    with server_process(env={"FLUX_AUTH_TOKENS_FILE": str(tmp_path / "tokens.toml")}) as server:
        with grpc.insecure_channel(server.address) as channel:
            kv = kv_pb2_grpc.KVStub(channel)
            assert not kv.Get(pb.GetRequest(key="orders/1"), metadata=bearer(secret), timeout=10).found
            with pytest.raises(grpc.RpcError) as refused:
                kv.Get(pb.GetRequest(key="orders/1"), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
