#!/usr/bin/env python3
"""FluxKV's own server CPU per unary Set, end to end: h2load (bench/h2load.py) against a
bare pygrpc-native no-op (bench/noop_server.py) and a node on pygrpc-native from each
checkout given (default: this one), in the same run, rounds interleaved (the order
reversed every other round). Per round, each node's server CPU per call minus the
no-op's; prints the medians and ranges of those differences. Comparing two commits:
extract the other one somewhere (git archive COMMIT | tar -x -C DIR) and pass both.

    .venv/bin/python bench/own_cost.py [--rounds 8] [--calls 20000] [CHECKOUT ...]

See bench/README.md (hot_path.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from h2load import h2load  # noqa: E402
from unary_set import Server  # noqa: E402

from fluxkv.bench.report import machine  # noqa: E402

NOOP = "noop-native"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("checkouts", nargs="*", type=Path, help="checkouts to run nodes from (default: this one)")
    p.add_argument("--rounds", type=int, default=8, help="rounds, each measuring every server once (default 8)")
    p.add_argument("--calls", type=int, default=20_000, help="calls per server and round (default 20000)")
    p.add_argument("--connections", type=int, default=4, help="h2load connections (default 4)")
    p.add_argument("--streams", type=int, default=25, help="calls in flight per connection (default 25)")
    p.add_argument("--json", metavar="FILE", help="append the result to FILE as one JSON line")
    args = p.parse_args()
    roots = [c.resolve() for c in args.checkouts] or [ROOT]
    info = machine()
    print(f"machine: {info['cpu']} ({info['cores']} cores, load {info['loadavg']}), Python {info['python']}")
    servers = [Server(NOOP, [sys.executable, str(ROOT / "bench" / "noop_server.py"), "--grpc-server", "native"])]
    for root in roots:
        argv = [sys.executable, str(root / "cmd" / "fluxkv-server"), "--port", "0", "--grpc-server", "native"]
        servers.append(Server(str(root), argv, {"FLUX_ADMIN_PORT": "0"}))
    cpu: dict[str, list[float]] = {s.name: [] for s in servers}
    rate: dict[str, list[float]] = {s.name: [] for s in servers}
    load = (args.connections, args.streams, 100)
    try:
        for server in servers:
            server.wait_ready()
            h2load(server.addresses, args.calls // 5, *load, server.proc.pid)  # warm-up
        for rnd in range(args.rounds):
            for server in servers if rnd % 2 == 0 else servers[::-1]:
                run = h2load(server.addresses, args.calls, *load, server.proc.pid)
                server.check_alive()
                cpu[server.name].append(run.server_cpu_us_per_call)
                rate[server.name].append(run.calls_per_s)
            print(f"round {rnd + 1}  " + "  ".join(f"{s.name}: {cpu[s.name][-1]:.1f} µs" for s in servers), flush=True)
    finally:
        for server in servers:
            server.stop()
    print(f"h2load: {args.calls} unary Sets of 100 B per server and round, {args.connections} connections x "
          f"{args.streams} streams; server CPU per call (all the server's threads)")  # fmt: skip
    result = {}
    for server in servers:
        own = [c - n for c, n in zip(cpu[server.name], cpu[NOOP], strict=True)]
        result[server.name] = {"cpu_us": cpu[server.name], "calls_per_s": rate[server.name], "own_us": own}
        c, r = cpu[server.name], rate[server.name]
        line = f"{server.name}: {statistics.median(c):.1f} µs per call ({min(c):.1f}-{max(c):.1f}), "
        line += f"{statistics.median(r):,.0f} calls/s"
        if server.name != NOOP:
            line += f"; minus the no-op, per round: median {statistics.median(own):.1f} µs "
            line += f"({min(own):.1f}-{max(own):.1f})"
        print(line)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"bench": "own_cost", "time": time.time(), "machine": info, "args": vars(args) | {
                "checkouts": [str(r) for r in roots]}, "servers": result}) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
