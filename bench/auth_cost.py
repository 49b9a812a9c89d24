#!/usr/bin/env python3
"""What tokens (FLUX_AUTH_TOKENS_FILE) cost per call, two ways:

1. In process: a handler behind the node's token check (fluxkv/server/auth.py:
   the authorization read from the call's metadata (which pygrpc-native's context
   builds on each call, as here), the Bearer parsed, SHA-256,
   a constant-time comparison with every digest, the role and the key prefixes)
   against the same handler unwrapped, driven without an event loop so that only
   the check is timed; process CPU per call, rounds interleaved, medians.
2. End to end (--e2e): h2load's unary Set (bench/h2load.py) against a node on
   pygrpc-native without a tokens file and one with (the calls carrying a
   write token), rounds interleaved; server CPU per call, and the difference.

    .venv/bin/python bench/auth_cost.py [--calls 200000] [--rounds 5] [--e2e] [--json FILE]

See bench/README.md (auth_cost.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
from h2load import KEY, h2load  # noqa: E402
from pygrpc_native._server import _Metadatum  # noqa: E402
from unary_set import Server  # noqa: E402

from fluxkv.bench.report import machine  # noqa: E402
from fluxkv.proto import kv_pb2 as pb  # noqa: E402
from fluxkv.proto import kv_pb2_grpc  # noqa: E402
from fluxkv.rpc import call_context  # noqa: E402
from fluxkv.security import tokens  # noqa: E402
from fluxkv.server.auth import NodeAuth  # noqa: E402


class _Call:
    """The call context a transport sets, with the metadata h2load's calls carry, built per
    call as pygrpc-native's context builds it (a tuple of namedtuples)."""

    def __init__(self, secret: str) -> None:
        self._metadata = (("user-agent", "h2load nghttp2/1.52.0"), ("authorization", f"Bearer {secret}"),
                          ("content-length", "25"))  # fmt: skip

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(_Metadatum(key, value) for key, value in self._metadata)


def _drive(fn: Callable[[Any], Awaitable[Any]], request: Any, calls: int) -> float:
    """CPU seconds per call of `calls` calls of a handler that never waits (no event loop)."""
    started = time.process_time()
    for _ in range(calls):
        coro = fn(request)
        try:
            coro.send(None)  # type: ignore[attr-defined]
        except StopIteration:
            pass
    return (time.process_time() - started) / calls


async def _handler(request: Any) -> Any:
    return request


def in_process(calls: int, rounds: int, tmp: Path) -> list[dict[str, Any]]:
    results = []
    multiset = pb.MultiSetRequest(items=[pb.SetRequest(key=f"orders/{i}", value=b"v") for i in range(100)])
    cases = [  # name, tokens in the file, the caller's prefixes, method, request
        ("Set, 1 token, every key", 1, [], "Set", pb.SetRequest(key="orders/1", value=b"v")),
        ("Set, 10 tokens, every key", 10, [], "Set", pb.SetRequest(key="orders/1", value=b"v")),
        ("Set, 100 tokens, every key", 100, [], "Set", pb.SetRequest(key="orders/1", value=b"v")),
        ("Set, 10 tokens, 3 prefixes", 10, ["carts/", "users/", "orders/"], "Set", pb.SetRequest(key="orders/1")),
        ("MultiSet of 100, 10 tokens, 3 prefixes", 10, ["carts/", "users/", "orders/"], "MultiSet", multiset),
    ]
    for name, count, prefixes, method, request in cases:
        secrets = [tokens.new_secret() for _ in range(count)]
        path = tmp / f"tokens-{count}-{len(prefixes)}.toml"
        path.write_text(
            "\n".join(
                tokens.toml_table(f"t{i}", s, tokens.Role.WRITE, prefixes if i == count - 1 else [])
                for i, s in enumerate(secrets)
            )
        )
        auth = NodeAuth(str(path))
        guarded = auth.guard({"fluxkv.v1.KV": {method: _handler}})["fluxkv.v1.KV"][method]
        call_context.current.set(_Call(secrets[-1]))  # the last token: every digest compared before it
        plain_s, guarded_s = [], []
        for rnd in range(rounds):
            pair = [(_handler, plain_s), (guarded, guarded_s)]
            for fn, into in pair if rnd % 2 == 0 else pair[::-1]:
                into.append(_drive(fn, request, calls))
        diffs = [(g - p) * 1e6 for g, p in zip(guarded_s, plain_s, strict=True)]
        results.append({
            "case": name,
            "plain_us": statistics.median(plain_s) * 1e6,
            "guarded_us": statistics.median(guarded_s) * 1e6,
            "cost_us": statistics.median(diffs),
            "cost_us_range": [min(diffs), max(diffs)],
        })  # fmt: skip
        print(
            f"{name:<42} check {statistics.median(diffs):6.2f} µs per call "
            f"({min(diffs):.2f}-{max(diffs):.2f}; unwrapped handler {statistics.median(plain_s) * 1e6:.2f} µs)"
        )
    return results


def end_to_end(calls: int, rounds: int, tmp: Path) -> dict[str, Any]:
    """Three nodes: without a tokens file, the same with the calls carrying the header anyway
    (what the header itself costs: HPACK, the metadata handed to Python), and with a tokens file."""
    secrets = [tokens.new_secret() for _ in range(10)]
    path = tmp / "tokens-e2e.toml"
    path.write_text("\n".join(tokens.toml_table(f"t{i}", s, tokens.Role.WRITE) for i, s in enumerate(secrets)))
    argv = [sys.executable, str(ROOT / "cmd" / "fluxkv-server"), "--port", "0", "--grpc-server", "native"]
    header = [f"authorization: Bearer {secrets[-1]}"]
    servers = [
        (Server("off", argv, {"FLUX_ADMIN_PORT": "0"}), []),
        (Server("off, header sent", argv, {"FLUX_ADMIN_PORT": "0"}), header),
        (Server("on", argv, {"FLUX_ADMIN_PORT": "0", "FLUX_AUTH_TOKENS_FILE": str(path)}), header),
    ]
    cpu: dict[str, list[float]] = {s.name: [] for s, _ in servers}
    sent = dict.fromkeys(cpu, 0)
    load = (4, 25, 100)
    try:
        for server, headers in servers:
            server.wait_ready()
            h2load(server.addresses, calls // 5, *load, server.proc.pid, headers)  # warm-up
            sent[server.name] += calls // 5
        for rnd in range(rounds):
            for server, headers in servers if rnd % 2 == 0 else servers[::-1]:
                run = h2load(server.addresses, calls, *load, server.proc.pid, headers)
                server.check_alive()
                sent[server.name] += calls
                cpu[server.name].append(run.server_cpu_us_per_call)
        # h2load counts a gRPC error as a success: every Set of one key takes the next revision.
        for server, _ in servers:
            with grpc.insecure_channel(server.address) as channel:
                got = kv_pb2_grpc.KVStub(channel).Get(
                    pb.GetRequest(key=KEY), metadata=[("authorization", f"Bearer {secrets[-1]}")], timeout=10
                )
            if got.mod_revision != sent[server.name]:
                raise RuntimeError(f"{server.name}: {got.mod_revision} Sets applied of {sent[server.name]} sent")
    finally:
        for server, _ in servers:
            server.stop()
    print(f"end to end (h2load unary Set, pygrpc-native, {rounds} rounds of {calls}), server CPU per call:")
    record: dict[str, Any] = {"us": cpu}
    for name in cpu:
        print(f"  {name:<18} {statistics.median(cpu[name]):6.1f} µs")
    for a, b in (("off, header sent", "off"), ("on", "off, header sent"), ("on", "off")):
        diffs = [x - y for x, y in zip(cpu[a], cpu[b], strict=True)]
        record[f"{a} - {b}"] = diffs
        print(f"  {a} - {b}: {statistics.median(diffs):.1f} µs ({min(diffs):.1f} to {max(diffs):.1f})")
    return record


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--calls", type=int, default=200_000, help="in-process calls per measurement (default 200000)")
    p.add_argument("--rounds", type=int, default=5, help="rounds, interleaved (default 5)")
    p.add_argument("--e2e", action="store_true", help="also the end-to-end figure with h2load")
    p.add_argument("--e2e-calls", type=int, default=20_000, help="h2load calls per node and round (default 20000)")
    p.add_argument("--json", metavar="FILE", help="append the result to FILE as one JSON line")
    args = p.parse_args()
    info = machine()
    print(f"machine: {info['cpu']} ({info['cores']} cores, load {info['loadavg']}), Python {info['python']}")
    with tempfile.TemporaryDirectory(prefix="fluxkv-auth-cost-") as tmp:
        record: dict[str, Any] = {"machine": info, "in_process": in_process(args.calls, args.rounds, Path(tmp))}
        if args.e2e:
            record["end_to_end"] = end_to_end(args.e2e_calls, args.rounds, Path(tmp))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
