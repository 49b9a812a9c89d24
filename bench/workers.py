#!/usr/bin/env python3
"""Unary Set throughput of `fluxkv-server --workers 1` against `--workers 2`, in
one run, alternating rounds, driven by the same fluxkv.Client (which routes each
key to its worker by the consistent-hash ring). Reports QPS, latency and the CPU
time per request of all the server's processes. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from unary_set import Server, machine, row  # noqa: E402

from fluxkv import Client, FluxKVError  # noqa: E402

COLS = (-6, -10, 9, 9, 9, 16, 8)


def workers(n: int) -> Server:
    """`fluxkv-server --workers N --port 0 --admin-port 0`: ready once its N workers serve; its CPU counts them all."""
    node = [sys.executable, str(ROOT / "cmd" / "fluxkv-server"), "--port", "0", "--admin-port", "0"]
    argv = [*node, "--workers", str(n)]
    return Server(f"workers={n}", argv, servers=n)


async def measure(server: Server, keys: list[str], value: bytes, args: argparse.Namespace) -> dict[str, float]:
    async with Client(server.addresses, timeout=10) as client:
        sent = 0
        latencies: list[float] = []
        failed = 0

        async def worker(count: int) -> None:
            nonlocal sent, failed
            while sent < count:
                key = keys[sent % len(keys)]
                sent += 1
                start = time.perf_counter()
                try:
                    await client.set(key, value)
                except FluxKVError:
                    failed += 1
                    continue
                latencies.append(time.perf_counter() - start)

        await asyncio.gather(*(worker(args.warmup) for _ in range(args.concurrency)))
        sent, latencies, failed = 0, [], 0
        cpu0, t0 = server.cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(worker(args.requests) for _ in range(args.concurrency)))
        seconds = time.perf_counter() - t0
        cpu = server.cpu_seconds() - cpu0
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"qps": len(latencies) / seconds, "p50_ms": q[49] * 1e3, "p99_ms": q[98] * 1e3,
            "cpu_us_per_req": cpu / args.requests * 1e6, "failed": failed}  # fmt: skip


async def bench(servers: list[Server], keys: list[str], value: bytes, args: argparse.Namespace) -> None:
    runs: dict[str, list[dict[str, float]]] = {s.name: [] for s in servers}
    print("\n" + row(COLS, "round", "server", "QPS", "p50 ms", "p99 ms", "srv CPU µs/req", "failed"))
    for rnd in range(1, args.rounds + 1):
        for s in servers:
            r = await measure(s, keys, value, args)
            runs[s.name].append(r)
            print(row(COLS, rnd, s.name, f"{r['qps']:.0f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
                      f"{r['cpu_us_per_req']:.1f}", int(r["failed"])), flush=True)  # fmt: skip
    print("\n" + row(COLS[1:], "server", "median QPS", "p50 ms", "p99 ms", "srv CPU µs/req", "failed"))
    medians = {}
    for name, rs in runs.items():
        mid = sorted(rs, key=lambda r: r["qps"])[(len(rs) - 1) // 2]
        medians[name] = statistics.median(r["qps"] for r in rs)
        cpu = statistics.median(r["cpu_us_per_req"] for r in rs)
        print(row(COLS[1:], name, f"{medians[name]:.0f}", f"{mid['p50_ms']:.2f}", f"{mid['p99_ms']:.2f}",
                  f"{cpu:.1f}", int(sum(r["failed"] for r in rs))))  # fmt: skip
    one, two = medians[servers[0].name], medians[servers[1].name]
    print(f"\nratio workers=2/workers=1 (median QPS): {two / one:.2f}")
    print(f"load average at the end: {[round(x, 2) for x in os.getloadavg()]}")


def main() -> int:
    p = argparse.ArgumentParser(description="Set QPS of one worker against two, through fluxkv.Client.")
    p.add_argument("-c", "--concurrency", type=int, default=50, help="requests in flight (default 50)")
    p.add_argument("-n", "--requests", type=int, default=20000, help="measured requests per round and server")
    p.add_argument("--warmup", type=int, default=1000, help="unmeasured requests before each measurement")
    p.add_argument("-r", "--keyspace", type=int, default=10000, help="distinct keys (default 10000)")
    p.add_argument("-d", "--value-size", type=int, default=100, help="value size in bytes (default 100)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    args = p.parse_args()
    rng = random.Random(1)
    keys = [f"bench-{rng.randrange(10**9):09d}" for _ in range(args.keyspace)]
    value = rng.randbytes(args.value_size)
    info = machine()
    print("unary Set through fluxkv.Client: fluxkv-server --workers 1 against --workers 2, alternating rounds")
    print(f"machine   {info['cpu']}, {info['cores']} cores, load {info['loadavg']}")
    print(f"software  Python {info['python']}, grpcio {info['grpcio']}, fluxkv {info['commit']}")
    print(f"settings  {args.requests} requests after {args.warmup} warm-up, {args.concurrency} in flight, "
          f"{args.keyspace} keys, {args.value_size}-byte values, {args.rounds} rounds")  # fmt: skip
    print("client    this process (one asyncio loop); server CPU: the parent and all its workers")
    servers: list[Server] = []
    try:
        servers = [workers(1), workers(2)]
        for s in servers:
            s.wait_ready()
        asyncio.run(bench(servers, keys, value, args))
    except KeyboardInterrupt:
        return 130
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for s in servers:
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
