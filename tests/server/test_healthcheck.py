"""`python -m fluxkv.server.healthcheck`, the Docker image's HEALTHCHECK: it asks the node that the FLUX_* environment
configures."""

from __future__ import annotations

import asyncio
import sys

import pytest

from tests.conftest import ROOT, running_node

pytestmark = pytest.mark.usefixtures("grpc_server")


async def test_the_health_check_command_asks_the_node() -> None:
    async def healthcheck(port: int) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fluxkv.server.healthcheck",
            env={"FLUX_SERVER_HOST": "0.0.0.0", "FLUX_SERVER_PORT": str(port)},
            cwd=ROOT,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await proc.communicate()
        assert proc.returncode is not None
        return proc.returncode, err.decode()

    async with running_node() as (node, _):
        assert await healthcheck(node.port) == (0, "")
        port = node.port
    code, err = await healthcheck(port)
    assert code == 1 and err.startswith(f"unhealthy: 127.0.0.1:{port}: UNAVAILABLE")
