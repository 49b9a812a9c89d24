"""The clients against a node that wants tokens: the SDK (Client, SyncClient, Watch), the
CLI, fluxkv-bench on both engines, and a client on Node.js's gRPC stack over TLS
(tests/interop/client.js), each with a writer's token, a reader's and none."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fluxkv import Client, PermissionDenied, SyncClient, Unauthenticated
from fluxkv.server.node import Node
from tests.conftest import ROOT, Certificates, server_process, settings, write_tokens
from tests.interop.test_grpc_js import grpc_js

pytestmark = pytest.mark.usefixtures("grpc_server")

TOKENS = {"writer": ("write", ["orders/"]), "reader": ("read", ()), "loader": ("write", ())}


async def test_the_sdk_sends_its_token_on_every_call_and_watch(tmp_path: Path) -> None:
    secrets = write_tokens(tmp_path / "tokens.toml", TOKENS)
    node = Node(settings(auth_tokens_file=str(tmp_path / "tokens.toml")))
    await node.start()
    try:
        async with Client(node.address, token=secrets["writer"]) as writer:
            async with writer.watch("orders/") as events:
                await writer.set("orders/1", b"paid")
                event = await anext(aiter(events))
            assert (event.key, event.value) == ("orders/1", b"paid")
            with pytest.raises(PermissionDenied) as outside:
                await writer.set("users/1", b"x")
            assert "may not touch key 'users/1'" in outside.value.message
        async with Client(node.address, token=secrets["reader"]) as reader:
            assert (await reader.get("orders/1")).value == b"paid"  # type: ignore[union-attr]
            with pytest.raises(PermissionDenied):
                await reader.set("orders/2", b"x")
        async with Client(node.address) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.get("orders/1")

        def read_blocking() -> bytes | None:  # in a thread: the node serves on this test's event loop
            with SyncClient(node.address, token=secrets["reader"]) as sync:
                item = sync.get("orders/1")
            return None if item is None else item.value

        assert await asyncio.to_thread(read_blocking) == b"paid"
        assert node.store.revision == 1
    finally:
        await node.stop()


def test_the_cli_and_fluxkv_bench_send_their_token(tmp_path: Path) -> None:
    secrets = write_tokens(tmp_path / "tokens.toml", TOKENS)
    with server_process(env={"FLUX_AUTH_TOKENS_FILE": str(tmp_path / "tokens.toml")}) as server:
        cli = [sys.executable, str(ROOT / "cmd" / "fluxkv"), "--addr", server.address]
        ok = subprocess.run(
            [*cli, "--token", secrets["writer"], "set", "orders/1", "v"], capture_output=True, text=True
        )
        assert ok.returncode == 0, ok.stderr
        from_environment = subprocess.run(
            [*cli, "get", "orders/1"], capture_output=True, text=True, env={"FLUX_TOKEN": secrets["reader"]}
        )
        assert (from_environment.returncode, from_environment.stdout) == (0, "v\n")
        refused = subprocess.run(
            [*cli, "--token", secrets["reader"], "set", "orders/1", "w"], capture_output=True, text=True
        )
        assert refused.returncode == 3 and "permission denied" in refused.stderr
        assert secrets["reader"] not in refused.stderr
        bench = [sys.executable, str(ROOT / "cmd" / "fluxkv-bench"), "--addr", server.address]
        for engine in ("lean", "grpcio"):
            out = tmp_path / f"{engine}.json"
            load = ["--engine", engine, "-n", "300", "-c", "5", "--warmup", "0", "-t", "set", "--json", str(out)]
            as_reader = {**os.environ, "FLUX_TOKEN": secrets["reader"]}
            done = subprocess.run([*bench, *load], capture_output=True, text=True, timeout=120, env=as_reader)
            assert done.returncode != 0 and "PERMISSION_DENIED" in done.stderr, done.stderr
            done = subprocess.run(
                [*bench, *load, "--token", secrets["loader"]], capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, done.stderr
        record = json.loads(out.read_text())
        assert (record["successes"], record["failures"], record["settings"]["token"]) == (300, {}, True)
        assert secrets["writer"] not in out.read_text()


def test_a_grpc_js_client_over_tls_with_tokens_gets_what_its_token_allows(
    certificates: Certificates, tmp_path: Path
) -> None:
    secrets = write_tokens(tmp_path / "tokens.toml", TOKENS)
    env = {**certificates.server_environ(mutual=True), "FLUX_AUTH_TOKENS_FILE": str(tmp_path / "tokens.toml")}
    mine = {"ca": certificates.ca, "cert": certificates.client_cert, "key": certificates.client_key}
    with server_process(env=env) as server:
        writer, reader = {**mine, "token": secrets["writer"]}, {**mine, "token": secrets["reader"]}
        assert grpc_js(server.address, "set", "orders/1", "paid", **writer) == {"ok": True, "answer": {"success": True}}
        assert grpc_js(server.address, "get", "orders/1", **reader)["answer"] == {"value": "paid", "found": True}
        refusals = {
            "no token": grpc_js(server.address, "get", "orders/1", **mine),
            "a read token on a write": grpc_js(server.address, "set", "orders/1", "x", **reader),
            "outside its prefixes": grpc_js(server.address, "del", "users/1", **writer),
            "in plaintext": grpc_js(server.address, "get", "orders/1", token=secrets["writer"]),
            "without a client certificate": grpc_js(
                server.address, "get", "orders/1", ca=certificates.ca, token=secrets["writer"]
            ),
        }
        assert {why: answer.get("code") for why, answer in refusals.items()} == {
            "no token": "UNAUTHENTICATED",
            "a read token on a write": "PERMISSION_DENIED",
            "outside its prefixes": "PERMISSION_DENIED",
            "in plaintext": "UNAVAILABLE",
            "without a client certificate": "UNAVAILABLE",
        }
        assert "service.KVService/Set: it needs role write" in refusals["a read token on a write"]["details"]
        assert "may not touch key 'users/1'" in refusals["outside its prefixes"]["details"]
        assert all(secrets["writer"] not in str(a) and secrets["reader"] not in str(a) for a in refusals.values())
        assert grpc_js(server.address, "get", "orders/1", **reader)["answer"] == {"value": "paid", "found": True}
