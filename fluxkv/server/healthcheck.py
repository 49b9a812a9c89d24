"""`python -m fluxkv.server.healthcheck`: is the node that the FLUX_* environment configures serving?

Asks the node's gRPC health service (grpc.health.v1, service "") at FLUX_SERVER_HOST:FLUX_SERVER_PORT (127.0.0.1
when the node listens on every interface; over TLS as another node would, with FLUX_TLS_CA_FILE, when the node serves
TLS) and exits 0 when it answers SERVING, else 1 with one line on stderr that
says why. The Docker image's HEALTHCHECK runs it in the node's container, with the node's environment;
deploy/native_stack.py calls check() for the nodes it starts.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fluxkv import config
from fluxkv.security import tls
from fluxkv.security.tls import TLS

TIMEOUT_S = 2.0


def node_address(settings: config.Settings) -> str:
    """Where a process on the node's host reaches the node's gRPC port."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"[{host}]:{settings.port}" if ":" in host else f"{host}:{settings.port}"


def check(address: str, timeout: float = TIMEOUT_S, peer: TLS | None = None) -> str | None:
    """None when the node at `address` (over TLS as `peer`, or in plaintext) is SERVING, else why not."""
    try:
        with tls.channel(address, None if peer is None else peer.channel_credentials()) as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        return f"{address}: {exc.code().name}: {exc.details()}"
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        return f"{address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}"
    return None


def main() -> None:
    try:
        settings = config.load({}, os.environ)
    except config.ConfigError as exc:
        sys.exit(f"unhealthy: {exc}")
    if settings.port == 0:
        sys.exit("unhealthy: FLUX_SERVER_PORT is 0 (a free port): no port to check")
    reason = check(node_address(settings), peer=tls.peer_tls(settings))
    if reason is not None:
        sys.exit(f"unhealthy: {reason}")


if __name__ == "__main__":
    main()
