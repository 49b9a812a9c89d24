"""Tokens on a real fluxkv-server process: SIGHUP reloads the file (a bad one is
refused and the old tokens stay), the workers' parent passes SIGHUP on, and a
bad tokens file stops the server at start-up with exit status 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from fluxkv.proto import kv_pb2 as pb
from fluxkv.proto import kv_pb2_grpc
from fluxkv.security import tokens
from tests.conftest import ROOT, ServerProcess, bearer, server_process, write_tokens

SERVER = [sys.executable, str(ROOT / "cmd" / "fluxkv-server")]
RELOADED = r"tokens reloaded from \S+: (\d+) tokens"
REFUSED = r"tokens not reloaded, keeping the (\d+) loaded before: (.*)"


def code_of(address: str, call: str, metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    """The status of a Get ("get") or Set ("set") of key orders/1 on the node at `address`."""
    with grpc.insecure_channel(address) as channel:
        kv = kv_pb2_grpc.KVStub(channel)
        try:
            if call == "get":
                kv.Get(pb.GetRequest(key="orders/1"), metadata=metadata, timeout=10)
            else:
                kv.Set(pb.SetRequest(key="orders/1", value=b"v"), metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def reload(server: ServerProcess, pattern: str, count: int) -> list[str]:
    server.proc.send_signal(signal.SIGHUP)
    return list(server.wait_for(pattern, count)[-1].groups())


@pytest.mark.usefixtures("grpc_server")
def test_sighup_reloads_the_tokens_file_and_refuses_a_bad_one(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    first = write_tokens(path, {"old": ("write", [])})
    with server_process(env={"FLUX_AUTH_TOKENS_FILE": str(path)}) as server:
        assert f"calls need a token: 1 tokens from {path} (old)" in server.log
        old = bearer(first["old"])
        assert code_of(server.address, "set", old) == grpc.StatusCode.OK

        # Rotation: the old token and a new one; then the new one alone, as a reader.
        new_secret = tokens.new_secret()
        path.write_text(path.read_text() + "\n" + tokens.toml_table("new", new_secret, tokens.Role.WRITE))
        assert reload(server, RELOADED, 1) == ["2"]
        new = bearer(new_secret)
        assert code_of(server.address, "set", new) == code_of(server.address, "set", old) == grpc.StatusCode.OK
        path.write_text(tokens.toml_table("new", new_secret, tokens.Role.READ))
        assert reload(server, RELOADED, 2) == ["1"]
        assert code_of(server.address, "get", old) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(server.address, "set", new) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(server.address, "get", new) == grpc.StatusCode.OK

        # A bad file is refused whole, with one line that says why; the tokens in force stay.
        path.write_text(path.read_text() + '\n[[token]]\nname = "x"\nrole = "writer"\n')
        count, why = reload(server, REFUSED, 1)
        assert count == "1"
        assert "invalid FLUX_AUTH_TOKENS_FILE" in why and "[[token]] #2 ('x')" in why
        path.write_text('[[token]]\nname = "x"\nsha256 = \n')
        count, why = reload(server, REFUSED, 2)
        assert "is not valid TOML" in why and "line 3" in why
        path.unlink()
        count, why = reload(server, REFUSED, 3)
        assert f"cannot read {path}" in why
        assert code_of(server.address, "get", new) == grpc.StatusCode.OK
        assert code_of(server.address, "get", old) == grpc.StatusCode.UNAUTHENTICATED
        assert len([line for line in server.lines if "tokens not reloaded" in line]) == 3
        assert new_secret not in server.log and first["old"] not in server.log
        assert server.stop() == 0


@pytest.mark.usefixtures("grpc_server")
def test_the_workers_parent_passes_sighup_on_to_every_worker(tmp_path: Path) -> None:
    path = tmp_path / "tokens.toml"
    write_tokens(path, {"a": ("read", [])})
    with server_process("--workers", "2", env={"FLUX_AUTH_TOKENS_FILE": str(path)}) as parent:
        parent.wait_for("serving on", 2)
        write_tokens(path, {"a": ("read", []), "b": ("read", [])})
        parent.proc.send_signal(signal.SIGHUP)
        parent.wait_for(RELOADED, 2)
        assert "passing SIGHUP on to 2 workers" in parent.log
        assert parent.proc.poll() is None
        assert parent.stop() == 0


BAD_FILES = [
    ('[[token]]\nname = "a"\nrole = read\n', "is not valid TOML: Invalid value (at line 3, column 8)"),
    ('[[token]]\nname = "a"\nsha256 = "{d}"\nrole = "reader"\n', "unknown role 'reader'; expected one of read, write"),
    (
        '[[token]]\nname = "a"\nsha256 = "{d}"\nrole = "read"\n[[token]]\nname = "b"\nsha256 = "{d}"\nrole = "read"\n',
        "[[token]] #2 ('b') has the same sha256 as 'a'",
    ),
    ('[[token]]\nname = "a"\nsha256 = "{d}"\nrole = "read"\nprefixes = "orders/"\n', "`prefixes` must be a non-empty"),
    ('[[token]]\nname = "a"\nsha256 = "{d}"\nrole = "read"\nprefixes = ["a/", ""]\n', "`prefixes` holds ''"),
    ('[[token]]\nname = "a"\nsha256 = "secret"\nrole = "read"\n', "`sha256` must be 64 hex digits"),
    ('[[token]]\nname = "a"\nsha256 = "{d}"\nrole = "read"\nprefix = ["a/"]\n', "unknown field 'prefix'"),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_bad_tokens_file_is_exit_2_at_start_naming_the_setting(
    tmp_path: Path, text: str, message: str, workers: str
) -> None:
    path = tmp_path / "tokens.toml"
    path.write_text(text.replace("{d}", tokens.digest("s").hex()))
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}
    env |= {"FLUX_AUTH_TOKENS_FILE": str(path), "FLUX_WORKERS": workers, "FLUX_ADMIN_PORT": "0"}
    result = subprocess.run([*SERVER, "--port", "0"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2, result.stderr
    assert f"fluxkv-server: error: invalid FLUX_AUTH_TOKENS_FILE: {path}" in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and "serving on" not in result.stderr


def test_an_unreadable_tokens_file_is_exit_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}
    env["FLUX_AUTH_TOKENS_FILE"] = str(tmp_path / "missing.toml")
    result = subprocess.run([*SERVER, "--port", "0"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert f"invalid FLUX_AUTH_TOKENS_FILE: cannot read {tmp_path / 'missing.toml'}" in result.stderr
