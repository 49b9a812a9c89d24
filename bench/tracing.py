#!/usr/bin/env python3
"""What tracing costs a FluxKV node: unary Set throughput of three nodes in one
run, alternating rounds, driven by bench/unary_set.py's closed-loop client:
tracing off (no endpoint), on at 10% (FLUX_TRACE_SAMPLE_RATIO=0.1, the default)
and on at 100%. The traced nodes really export, over OTLP/gRPC, to
bench/otlp_sink.py, a collector in its own process that counts the spans it
receives and discards them; the run ends by saying how many arrived.

The client sends no trace context, so each node samples on its own, at its
ratio. Ratios against the node with tracing off are what to compare across
runs and machines. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from unary_set import Run, Server, measure, row, summarize  # noqa: E402

from fluxkv.bench.report import machine  # noqa: E402
from fluxkv.obs.tracing import ENDPOINT_VARIABLES  # noqa: E402
from fluxkv.proto import kv_pb2  # noqa: E402

NODES = (("off", None), ("10%", 0.1), ("100%", 1.0))
ROUND_COLS = (-6, -6, 9, 9, 9, 16, 8)
SUMMARY_COLS = (-6, 11, 9, 9, 16, 10, 18)
RECEIVED = re.compile(r"spans received: (\{.*\})")


def node_id(name: str) -> str:
    return "tracing-" + name.rstrip("%")


def start_servers(sink: str) -> list[Server]:
    argv = [sys.executable, str(ROOT / "cmd" / "fluxkv-server"), "--port", "0"]
    servers = []
    for name, ratio in NODES:
        env = {"FLUX_ADMIN_PORT": "0", "FLUX_NODE_ID": node_id(name)}
        if ratio is not None:
            env |= {"FLUX_JAEGER_ENDPOINT": sink, "FLUX_TRACE_SAMPLE_RATIO": str(ratio)}
        servers.append(Server(name, argv, env))
    return servers


async def bench(servers: list[Server], requests: list[Any], args: argparse.Namespace) -> list[Run]:
    runs: list[Run] = []
    print("\n" + row(ROUND_COLS, "round", "node", "QPS", "p50 ms", "p99 ms", "srv CPU µs/req", "failed"))
    for rnd in range(1, args.rounds + 1):
        for server in servers:  # alternate: off, 10%, 100%, off, ...
            r = await measure(server, rnd, requests, args)
            runs.append(r)
            print(row(ROUND_COLS, rnd, r.server, f"{r.qps:.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
                      f"{r.server_cpu_s_per_req * 1e6:.1f}", r.failed), flush=True)  # fmt: skip
    return runs


def report(
    info: dict[str, Any], args: argparse.Namespace, runs: list[Run], spans: dict[str, int], sink_cpu: float
) -> None:
    summaries = {name: summarize(runs, name) for name, _ in NODES}
    off = summaries["off"]
    sent = args.rounds * (args.warmup + args.requests)  # every request of a node, warm-up included
    print(
        "\n"
        + row(SUMMARY_COLS, "node", "median QPS", "p50 ms", "p99 ms", "srv CPU µs/req", "QPS/off", "spans exported")
    )
    for name, _ in NODES:
        s = summaries[name]
        exported = spans.get(node_id(name), 0)
        print(row(SUMMARY_COLS, name, f"{s['median_qps']:.0f}", f"{s['p50_ms']:.2f}", f"{s['p99_ms']:.2f}",
                  f"{s['server_cpu_s_per_req'] * 1e6:.1f}", f"{s['median_qps'] / off['median_qps']:.2f}",
                  f"{exported} ({exported / sent:.1%})"))  # fmt: skip
    print("(p50/p99 of each node's median round; CPU per request: median over rounds; spans exported: received by")
    print(f" the sink, against the {sent} calls the node served, warm-ups included)")
    ratios: dict[str, Any] = {}
    for name, _ in NODES[1:]:
        per_round = [
            t.qps / o.qps for t, o in zip(*([r for r in runs if r.server == n] for n in (name, "off")), strict=True)
        ]
        cpu = summaries[name]["server_cpu_s_per_req"] / off["server_cpu_s_per_req"]
        ratios[name] = {"median_qps": summaries[name]["median_qps"] / off["median_qps"], "server_cpu_per_req": cpu,
                        "per_round": per_round}  # fmt: skip
        print(f"ratio {name}/off (median QPS): {ratios[name]['median_qps']:.2f}   server CPU per request: {cpu:.2f}x   "
              "per round: " + " ".join(f"{x:.2f}" for x in per_round))  # fmt: skip
    total = sum(spans.values())
    if total:
        print(f"the sink used {sink_cpu * 1e6 / total:.1f} µs of CPU per span received ({total} spans)")
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average at the end: {info['loadavg_end']} (other work on the machine shows here)")
    if args.json:
        line = {
            "bench": "tracing",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": info,
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "nodes": summaries,
            "ratios_to_off": ratios,
            "spans_exported": spans,
            "calls_per_node": sent,
            "sink_cpu_s": sink_cpu,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            f.write(json.dumps(line) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description="Unary Set QPS of a FluxKV node with tracing off, at 10% and at 100%.")
    p.add_argument("-c", "--concurrency", type=int, default=50, help="requests in flight (default 50)")
    p.add_argument("-n", "--requests", type=int, default=20000, help="measured requests per round and node")
    p.add_argument("--warmup", type=int, default=1000, help="unmeasured requests before each measurement")
    p.add_argument("--conns", type=int, default=1, help="gRPC channels (connections) per node (default 1)")
    p.add_argument("-r", "--keyspace", type=int, default=10000, help="distinct keys (default 10000)")
    p.add_argument("-d", "--value-size", type=int, default=100, help="value size in bytes (default 100)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--json", metavar="FILE", help="append one JSON line with machine, settings and results")
    args = p.parse_args()
    if min(args.concurrency, args.requests, args.conns, args.keyspace, args.rounds) < 1 or args.warmup < 0:
        p.error("-c, -n, --conns, -r and --rounds must be at least 1, --warmup at least 0")
    for variable in ENDPOINT_VARIABLES:  # the node with tracing off must not find an endpoint
        os.environ.pop(variable, None)

    rng = random.Random(1)  # the same keys in the same order for every run
    value = rng.randbytes(args.value_size)
    keys = [f"bench-{i:08d}" for i in range(args.keyspace)]
    requests = [kv_pb2.SetRequest(key=rng.choice(keys), value=value) for _ in range(args.warmup + args.requests)]
    info = machine()
    print("unary Set: a FluxKV node with tracing off, on at 10% and on at 100%, same client, alternating rounds")
    print(f"machine   {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), load {info['loadavg']}")
    print(f"software  Python {info['python']}, grpcio {info['grpcio']}, protobuf {info['protobuf']}, "
          f"fluxkv {info['commit']}")  # fmt: skip
    print(f"settings  {args.requests} requests after {args.warmup} warm-up, {args.concurrency} in flight, "
          f"{args.conns} connection(s), {args.keyspace} keys, {args.value_size}-byte values, "
          f"{args.rounds} round(s) per node")  # fmt: skip
    print(
        "export    OTLP/gRPC (batched) to bench/otlp_sink.py, a collector in its own process that counts and discards"
    )
    print("client    this process: one asyncio loop, closed loop, no trace context sent (each node samples by itself)")

    sink = Server("sink", [sys.executable, str(ROOT / "bench" / "otlp_sink.py")])
    servers: list[Server] = []
    try:
        sink.wait_ready()
        sink_cpu0 = sink.cpu_seconds()
        servers = start_servers(sink.address)
        for s in servers:
            s.wait_ready()
        runs = asyncio.run(bench(servers, requests, args))
        for s in servers:  # at SIGTERM a node exports what it still buffers
            s.stop()
        sink_cpu = sink.cpu_seconds() - sink_cpu0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for s in servers:
            s.stop()
        sink.stop()
    received = [m.group(1) for line in sink.tail if (m := RECEIVED.search(line))]
    if not received:
        print("error: the sink did not say what it received:\n" + "".join(sink.tail), file=sys.stderr)
        return 1
    report(info, args, runs, json.loads(received[-1]), sink_cpu)
    return 0


if __name__ == "__main__":
    sys.exit(main())
