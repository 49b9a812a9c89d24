#!/usr/bin/env python3
"""What serving a call costs on each gRPC server: h2load (bench/h2load.py) sends the
same unary Set to a bare grpc.aio no-op, a bare pygrpc-native no-op, a node on
grpcio and a node on pygrpc-native (FLUX_GRPC_SERVER), rounds interleaved in one
run, and this prints calls/s, server CPU per call, the ratios, and each node's
revision checked against the calls sent: h2load counts a call answered HTTP 200
with a gRPC error as a success, the node's revision does not. Every server runs on
the event loop a node would choose (FLUX_EVENT_LOOP=auto); with --event-loop
asyncio --event-loop uvloop, each runs on each of those loops instead. With
--cdc-url, a node on pygrpc-native with CDC on (publishing to that broker) joins
the rounds, so CDC's cost is measured without a Python client in the way; with
--workers N, a native `fluxkv-server --workers N`, one h2load per worker at once.

    .venv/bin/python bench/transport.py [--calls 100000] [--rounds 3] [--event-loop L ...] [--json FILE]

See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc
import pygrpc_native

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from h2load import H2loadRun, add_load_arguments, append_record, h2load  # noqa: E402
from unary_set import Server, delete_cdc_objects, interrupt, row  # noqa: E402

from fluxkv.bench.report import machine  # noqa: E402
from fluxkv.proto import kv_pb2, kv_pb2_grpc  # noqa: E402
from fluxkv.server.grpc_transport import EVENT_LOOPS  # noqa: E402

NODE_ENV = {"FLUX_ADMIN_PORT": "0"}
NOOP, NODE = "noop", "node"
CDC_NODE = "node-native-cdc"


def loop_suffix(event_loop: str) -> str:
    return "" if event_loop == "auto" else f"+{event_loop}"


def servers(event_loops: list[str], cdc_url: str | None, cdc_names: str, workers: int) -> list[Server]:
    """The servers to compare, in the order each round measures them."""
    started = []
    for loop in event_loops:
        suffix = loop_suffix(loop)
        for grpc_server in ("grpcio", "native"):
            where = ["--grpc-server", grpc_server, "--event-loop", loop]
            noop = [sys.executable, str(ROOT / "bench" / "noop_server.py"), *where]
            node = [sys.executable, str(ROOT / "cmd" / "fluxkv-server"), "--port", "0", *where]
            started.append(Server(f"{NOOP}-{grpc_server}{suffix}", noop))
            started.append(Server(f"{NODE}-{grpc_server}{suffix}", node, NODE_ENV))
    if cdc_url:
        node = [sys.executable, str(ROOT / "cmd" / "fluxkv-server"), "--port", "0", "--event-loop", event_loops[0]]
        env = {"FLUX_RABBITMQ_URL": cdc_url, "FLUX_CDC_EXCHANGE": cdc_names, "FLUX_CDC_QUEUE": cdc_names}
        started.append(Server(CDC_NODE, node, {**NODE_ENV, **env}))
    if workers > 1:
        node = [sys.executable, str(ROOT / "cmd" / "fluxkv-server"), "--port", "0", "--event-loop", event_loops[0],
                "--workers", str(workers)]  # fmt: skip
        started.append(Server(f"{NODE}-native-workers{workers}", node, NODE_ENV, servers=workers))
    for server in started:
        server.wait_ready()
    return started


async def revision(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        info = await kv_pb2_grpc.KVStub(channel).Info(kv_pb2.InfoRequest(), timeout=10)
    return int(info.revision)


def median_run(runs: list[H2loadRun]) -> H2loadRun:
    return sorted(runs, key=lambda r: r.calls_per_s)[(len(runs) - 1) // 2]


def report(
    info: dict[str, Any], args: argparse.Namespace, runs: dict[str, list[H2loadRun]], checks: dict[str, str]
) -> None:
    print(
        f"machine: {info['cpu']} ({info['cores']} cores, load {info['loadavg']}), Python {info['python']}, "
        f"grpcio {info['grpcio']}, pygrpc-native {info['pygrpc_native']}"
    )
    print(f"load: h2load, {args.calls} unary Sets of {args.value_size} B per round, {args.connections} connections x "
          f"{args.streams} streams, {args.rounds} rounds interleaved")  # fmt: skip
    widths = (-22, 10, 10, 10, 9, 9, 9)
    print(row(widths, "server", "calls/s", "server µs", "client µs", "mean ms", "p50 ms", "p99 ms"))
    for name, rs in runs.items():
        m = median_run(rs)
        cpu = (f"{m.server_cpu_us_per_call:.0f}", f"{m.client_cpu_us_per_call:.1f}")
        latency = (f"{m.mean_ms:.2f}", f"{m.p50_ms:.2f}", f"{m.p99_ms:.2f}")
        print(row(widths, name, f"{m.calls_per_s:,.0f}", *cpu, *latency))
    print("(median round by calls/s; server and client µs: CPU per call, the client being h2load)")
    for loop in args.event_loop or ["auto"]:
        tag = loop_suffix(loop)
        native, grpcio = f"{NODE}-native{tag}", f"{NODE}-grpcio{tag}"
        for a, b in ((native, grpcio), (f"{NOOP}-native{tag}", f"{NOOP}-grpcio{tag}")):
            ratios = [x.calls_per_s / y.calls_per_s for x, y in zip(runs[a], runs[b], strict=True)]
            print(f"{a} / {b}: {statistics.median(ratios):.2f}x the calls/s "
                  f"(rounds {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
        for grpc_server in ("native", "grpcio"):
            node, noop = (median_run(runs[f"{kind}-{grpc_server}{tag}"]) for kind in (NODE, NOOP))
            own = node.server_cpu_us_per_call - noop.server_cpu_us_per_call
            print(f"FluxKV's own cost on {grpc_server}{tag}: {own:.0f} µs of server CPU per call (node minus no-op)")
    # The CDC node and the workers run on the first event loop: compared with the native node on it.
    single = f"{NODE}-native{loop_suffix((args.event_loop or ['auto'])[0])}"
    if CDC_NODE in runs:
        on, off = median_run(runs[CDC_NODE]), median_run(runs[single])
        ratios = [x.calls_per_s / y.calls_per_s for x, y in zip(runs[CDC_NODE], runs[single], strict=True)]
        print(f"CDC on / off on native: {statistics.median(ratios):.2f}x the calls/s (rounds {min(ratios):.2f}-"
              f"{max(ratios):.2f}), {on.server_cpu_us_per_call - off.server_cpu_us_per_call:+.0f} µs of server CPU "
              "per call (the broker's CPU not counted)")  # fmt: skip
    if args.workers > 1:
        many = f"{NODE}-native-workers{args.workers}"
        ratios = [x.calls_per_s / y.calls_per_s for x, y in zip(runs[many], runs[single], strict=True)]
        print(f"{args.workers} workers / 1: {statistics.median(ratios):.2f}x the calls/s "
              f"(rounds {min(ratios):.2f}-{max(ratios):.2f})")  # fmt: skip
    for name, check in checks.items():
        print(f"{name}: {check}")


async def main_async(args: argparse.Namespace) -> int:
    info = machine()
    info["pygrpc_native"] = pygrpc_native.__version__
    cdc_names = f"fluxkv-bench-{uuid.uuid4().hex[:8]}"
    started = servers(args.event_loop or ["auto"], args.cdc_url, cdc_names, args.workers)
    try:
        sent = {s.name: 0 for s in started}
        runs: dict[str, list[H2loadRun]] = {s.name: [] for s in started}
        load = (args.connections, args.streams, args.value_size)
        for server in started:  # warm-up, not measured
            sent[server.name] += h2load(server.addresses, args.calls // 10, *load, server.proc.pid).calls
        for rnd in range(1, args.rounds + 1):
            for server in started:
                run = h2load(server.addresses, args.calls, *load, server.proc.pid)
                server.check_alive()
                sent[server.name] += run.calls
                runs[server.name].append(run)
                print(f"round {rnd}  {server.name:<22} {run.calls_per_s:>9,.0f} calls/s  "
                      f"{run.server_cpu_us_per_call:6.0f} µs server CPU per call", flush=True)  # fmt: skip
        checks, failed = {}, False
        for server in started:
            if server.name.startswith(NODE):
                got = sum([await revision(address) for address in server.addresses])
                ok = got == sent[server.name]
                failed |= not ok
                verdict = "every call applied" if ok else "calls FAILED"
                checks[server.name] = f"revision {got}, {sent[server.name]} calls sent: {verdict}"
    finally:
        for server in started:
            server.stop()
        if args.cdc_url:
            await delete_cdc_objects(args.cdc_url, cdc_names)
    report(info, args, runs, checks)
    if args.json:
        append_record(args.json, "transport", info, args, runs, checks)
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--calls", type=int, default=100_000, help="calls per server (worker) and round (default 100000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each measuring every server once (default 3)")
    add_load_arguments(p)
    p.add_argument("--value-size", type=int, default=100, help="bytes per value (default 100)")
    p.add_argument(
        "--event-loop",
        action="append",
        choices=EVENT_LOOPS,
        help="run every server on this event loop (FLUX_EVENT_LOOP); repeatable (default: auto alone)",
    )
    p.add_argument("--cdc-url", metavar="AMQP_URL", help="also measure a native node with CDC on, to this broker")
    p.add_argument("--workers", type=int, default=1, help="also measure a native node with N workers (default: none)")
    p.add_argument("--json", metavar="FILE", help="append the result to FILE as one JSON line")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, interrupt)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
