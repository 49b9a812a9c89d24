#!/usr/bin/env python3
"""FluxKV's own server CPU per call and per item, end to end: h2load (bench/h2load.py)
against a bare pygrpc-native no-op (bench/noop_server.py) and nodes on pygrpc-native
from each checkout given (default: this one), one per append-only file policy asked
for (--aof: off, no, everysec), in the same run, rounds interleaved (the order
reversed every other round). Each round measures every server with every method
asked for (--methods: unary Set and Get of one key, MultiSet and MultiGet of
--items keys a call). Per round and method, each node's server CPU per call minus
the no-op's; prints the medians and ranges of those differences, and per item for
the batch methods. The Sets and MultiSets applied are checked against the node's
revision (h2load counts a gRPC error as a success). Comparing two commits: extract
the other one somewhere (git archive COMMIT | tar -x -C DIR) and pass both.

    .venv/bin/python bench/own_cost.py [--rounds 8] [--calls 20000] [--methods Set,Get,MultiSet,MultiGet]
        [--aof off,no,everysec] [CHECKOUT ...]

See bench/README.md (hot_path.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from h2load import Call, add_load_arguments, batch_call, h2load, revision, unary_call  # noqa: E402
from unary_set import Server  # noqa: E402

from fluxkv.bench.report import machine  # noqa: E402

NOOP = "noop-native"
UNARY = ("Set", "Get")
BATCH = ("MultiSet", "MultiGet")
POLICIES = ("off", "no", "everysec")


def methods_arg(text: str) -> list[str]:
    methods = text.split(",")
    if unknown := set(methods) - {*UNARY, *BATCH}:
        raise argparse.ArgumentTypeError(f"unknown methods {sorted(unknown)}; choose from {UNARY + BATCH}")
    # A Get reads what the Sets wrote, a MultiGet what the MultiSets wrote.
    return sorted(methods, key=(*UNARY, *BATCH).index)


def policies_arg(text: str) -> list[str]:
    policies = text.split(",")
    if unknown := set(policies) - set(POLICIES):
        raise argparse.ArgumentTypeError(f"unknown AOF policies {sorted(unknown)}; choose from {POLICIES}")
    return policies


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rounds", type=int, default=8, help="rounds, each measuring every server once (default 8)")
    p.add_argument("--calls", type=int, default=20_000, help="unary calls per server, method and round (20000)")
    p.add_argument("--batch-calls", type=int, default=2_000, help="batch calls per server, method and round (2000)")
    p.add_argument("--items", type=int, default=100, help="keys per MultiSet and MultiGet (default 100)")
    p.add_argument("-d", "--value-size", type=int, default=100, help="value size in bytes (default 100)")
    p.add_argument("--methods", type=methods_arg, default=["Set"], help="comma-separated (default Set)")
    p.add_argument("--aof", type=policies_arg, default=["off"], help="nodes' AOF policies, comma-separated (off)")
    add_load_arguments(p)


def node_servers(roots: Sequence[Path], policies: Sequence[str], directory: Path) -> list[Server]:
    """The no-op, then a node on pygrpc-native per checkout and AOF policy (its file in `directory`)."""
    servers = [Server(NOOP, [sys.executable, str(ROOT / "bench" / "noop_server.py"), "--grpc-server", "native"])]
    for n, root in enumerate(roots):
        for policy in policies:
            name = (f"{root.name} " if len(roots) > 1 else "") + f"aof={policy}"
            env = {"FLUX_ADMIN_PORT": "0", "FLUX_AOF_FILENAME": ""}
            if policy != "off":
                env |= {"FLUX_AOF_FILENAME": str(directory / f"node-{n}-{policy}.aof"), "FLUX_AOF_APPEND_FSYNC": policy}
            argv = [sys.executable, str(root / "cmd" / "fluxkv-server"), "--port", "0", "--grpc-server", "native"]
            servers.append(Server(name, argv, env))
    return servers


def measure(roots: Sequence[Path], args: argparse.Namespace) -> dict[str, Any]:
    """Every server (the no-op, then the nodes) with every method, rounds interleaved.
    Returns {server: {method: {"cpu_us": [per round], "calls_per_s": [...], "own_us": [...]}}}."""
    calls = [unary_call(m, args.value_size) if m in UNARY else batch_call(m, args.items, args.value_size)
             for m in args.methods]  # fmt: skip
    load = (args.connections, args.streams, args.value_size)
    with tempfile.TemporaryDirectory(prefix="fluxkv-own-cost-") as tmp:
        servers = node_servers(roots, args.aof, Path(tmp))
        result: dict[str, Any] = {s.name: {c.method: {"cpu_us": [], "calls_per_s": []} for c in calls} for s in servers}
        try:

            def run(server: Server, call: Call, count: int) -> tuple[float, float]:
                before = revision(server.address) if server.name != NOOP else 0
                r = h2load(server.addresses, count, *load, server.proc.pid, call=call)
                server.check_alive()
                if server.name != NOOP and call.method in ("Set", "MultiSet"):
                    applied = revision(server.address) - before
                    if applied != r.calls * call.items:
                        raise RuntimeError(f"{server.name}: {applied} writes applied, {r.calls * call.items} sent")
                return r.server_cpu_us_per_call, r.calls_per_s

            def count(call: Call) -> int:
                return args.calls if call.items == 1 else args.batch_calls

            for server in servers:
                server.wait_ready()
                for call in calls:
                    run(server, call, count(call) // 5)  # warm-up; the Gets' key and the MultiGets' keys exist
            for rnd in range(args.rounds):
                line = []
                for server in servers if rnd % 2 == 0 else servers[::-1]:
                    for call in calls:
                        cpu, rate = run(server, call, count(call))
                        result[server.name][call.method]["cpu_us"].append(cpu)
                        result[server.name][call.method]["calls_per_s"].append(rate)
                    line.append(f"{server.name}: " + " ".join(f"{m} {result[server.name][m]['cpu_us'][-1]:.0f}"
                                                            for m in args.methods))  # fmt: skip
                print(f"round {rnd + 1}  µs per call  " + "  ".join(line), flush=True)
        finally:
            for server in servers:
                server.stop()
    for methods in result.values():
        for method, r in methods.items():
            r["own_us"] = [c - n for c, n in zip(r["cpu_us"], result[NOOP][method]["cpu_us"], strict=True)]
    return result


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"h2load, {args.connections} connections x {args.streams} streams, {args.value_size}-byte values: "
          f"{args.calls} unary calls, {args.batch_calls} batch calls of {args.items} keys per server, method and "
          f"round, {args.rounds} rounds; server CPU (all the server's threads), medians (ranges) over the rounds; "
          "'own' is the node's minus the no-op's, per round")  # fmt: skip
    for method in args.methods:
        items = 1 if method in UNARY else args.items
        for name, methods in result.items():
            c, r, own = methods[method]["cpu_us"], methods[method]["calls_per_s"], methods[method]["own_us"]
            line = f"{method:9} {name:22} {statistics.median(c):8.1f} µs per call ({min(c):.1f}-{max(c):.1f})"
            line += f" {statistics.median(r):9,.0f} calls/s"
            if items > 1:
                line += f"  {statistics.median(c) / items:5.2f} µs per item"
            if name != NOOP:
                line += f"  own {statistics.median(own) / items:6.2f} µs"
                line += f" ({min(own) / items:.2f}-{max(own) / items:.2f})" + (" per item" if items > 1 else "")
            print(line)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("checkouts", nargs="*", type=Path, help="checkouts to run nodes from (default: this one)")
    add_arguments(p)
    p.add_argument("--json", metavar="FILE", help="append the result to FILE as one JSON line")
    args = p.parse_args()
    roots = [c.resolve() for c in args.checkouts] or [ROOT]
    info = machine()
    print(f"machine: {info['cpu']} ({info['cores']} cores, load {info['loadavg']}), Python {info['python']}")
    result = measure(roots, args)
    report(result, args)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"bench": "own_cost", "time": time.time(), "machine": info, "args": vars(args) | {
                "checkouts": [str(r) for r in roots]}, "servers": result}) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
