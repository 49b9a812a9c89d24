"""A Flux-KV client on another gRPC stack (Node.js's @grpc/grpc-js, tests/interop/client.js),
speaking Flux-KV's proto, against a node over TLS and mutual TLS: what works and what is refused."""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any

import pytest

from tests.conftest import ROOT, Certificates, server_process

pytestmark = pytest.mark.usefixtures("grpc_server")

CLIENT = ROOT / "tests" / "interop" / "client.js"


def grpc_js(address: str, *call: str, **options: str) -> dict[str, Any]:
    """One call from the Node.js client; its answer, or its failure's code and details."""
    node = shutil.which("node")
    assert node is not None, "Node.js is needed: tests/run.sh installs it"
    flags = [arg for name, value in options.items() for arg in (f"--{name}", value)]
    done = subprocess.run([node, str(CLIENT), address, *flags, *call], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


def test_a_grpc_js_client_works_over_tls_and_is_refused_in_plaintext(certificates: Certificates) -> None:
    with server_process(env=certificates.server_environ()) as server:
        tls = {"ca": certificates.ca}
        assert grpc_js(server.address, "set", "js:key", "from Node.js", **tls) == {
            "ok": True,
            "answer": {"success": True},
        }
        assert grpc_js(server.address, "get", "js:key", **tls)["answer"] == {"value": "from Node.js", "found": True}
        assert grpc_js(server.address, "del", "js:key", **tls)["answer"] == {"success": True}
        assert grpc_js(server.address, "get", "js:key", **tls)["answer"] == {"value": "", "found": False}
        plaintext = grpc_js(server.address, "get", "js:key")
        assert (plaintext["ok"], plaintext["code"]) == (False, "UNAVAILABLE")
        wrong_ca = grpc_js(server.address, "get", "js:key", ca=certificates.other_ca)
        assert (wrong_ca["ok"], wrong_ca["code"]) == (False, "UNAVAILABLE")


def test_a_grpc_js_client_needs_its_certificate_under_mutual_tls(certificates: Certificates) -> None:
    with server_process(env=certificates.server_environ(mutual=True)) as server:
        mine = {"ca": certificates.ca, "cert": certificates.client_cert, "key": certificates.client_key}
        assert grpc_js(server.address, "set", "js:key", "v", **mine)["ok"]
        without = grpc_js(server.address, "get", "js:key", ca=certificates.ca)
        assert (without["ok"], without["code"]) == (False, "UNAVAILABLE")
        other = {"ca": certificates.ca, "cert": certificates.other_client_cert, "key": certificates.other_client_key}
        assert grpc_js(server.address, "get", "js:key", **other)["code"] == "UNAVAILABLE"
        assert grpc_js(server.address, "get", "js:key", **mine)["answer"] == {"value": "v", "found": True}
