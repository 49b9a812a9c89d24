#!/usr/bin/env python3
"""Unary Set throughput of a FluxKV node against a no-op reference on the same gRPC server,
both measured in the same run, alternately, by the same closed-loop client. With
--cdc-url, a third node publishes every change to that RabbitMQ broker (CDC on,
publisher confirms, persistent messages, a durable queue), and the ratio
CDC on / CDC off is reported too; --cdc-format flux-kv measures Flux-KV's
message format (one message per change) instead, and giving both formats
measures a node of each in the same rounds and reports flux-kv / fluxkv.
With --baseline, the node of another checkout
(say, the main branch's) is measured in the same rounds, and the ratio this
node / baseline is reported: what a change to the request path costs.

The ratios are what to compare across runs and machines; absolute QPS on a noisy
shared machine is not. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aio_pika
import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fluxkv.bench.report import machine  # noqa: E402
from fluxkv.bench.server_probe import cpu_seconds  # noqa: E402
from fluxkv.proto import kv_pb2, kv_pb2_grpc  # noqa: E402
from fluxkv.server.grpc_transport import SERVERS, VERSIONS  # noqa: E402

METHOD = "/fluxkv.v1.KV/Set"
CDC = "fluxkv+cdc"
# The CDC node of each FLUX_CDC_FORMAT.
CDC_SERVERS = {"fluxkv": CDC, "flux-kv": "fluxkv+cdc-fk"}
BASELINE = "baseline"
# The nodes' admin HTTP ports: free ones, so that nodes (and runs) never collide.
NODE_ENV = {"FLUX_ADMIN_PORT": "0"}
# A node's "serving on 127.0.0.1:PORT", fluxkv-gateway's "serving on http://127.0.0.1:PORT/".
READY = re.compile(r"serving on (?:https?://)?(\S+:\d+)")
START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 10.0
CDC_DRAIN_POLL_S = 0.01
SetCall = Callable[..., Awaitable[Any]]


class Server:
    """A server child process; stderr is drained by a thread (last lines kept for errors).
    It is ready once `servers` "serving on" lines came (fluxkv-server --workers N says N)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None, servers: int = 1) -> None:
        self.name = name
        self.servers = servers
        self.addresses: list[str] = []
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace")
            self.tail.append(line)
            if m := READY.search(line):
                self.addresses.append(m.group(1))
                if len(self.addresses) == self.servers:
                    self._ready.set()
        self._ready.set()  # exited: wake wait_ready

    @property
    def address(self) -> str:
        return self.addresses[0]

    def wait_ready(self) -> None:
        if not self._ready.wait(START_TIMEOUT_S) or len(self.addresses) < self.servers:
            raise RuntimeError(f"{self.name} server did not start:\n" + "".join(self.tail))

    def cpu_seconds(self) -> float:
        """CPU time of the server process (all its threads) and its children, from /proc."""
        return cpu_seconds(self.proc.pid)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} server exited with {self.proc.returncode}:\n" + "".join(self.tail))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Run:
    server: str
    round: int
    ok: int
    failed: int
    seconds: float
    qps: float
    p50_ms: float
    p99_ms: float
    server_cpu_s_per_req: float
    client_cpu_s_per_req: float
    cdc_drain_s: float


async def closed_loop(stubs: list[SetCall], requests: list[Any], concurrency: int) -> tuple[int, list[float]]:
    """Send `requests` keeping `concurrency` in flight; return (failures, latencies of successes)."""
    latencies: list[float] = []
    failed = 0
    sent = 0

    async def worker(call: SetCall) -> None:
        nonlocal failed, sent
        while sent < len(requests):
            request = requests[sent]
            sent += 1
            start = time.perf_counter()
            try:
                await call(request, timeout=CALL_TIMEOUT_S)
            except grpc.RpcError:
                failed += 1
                continue
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(worker(stubs[w % len(stubs)]) for w in range(concurrency)))
    return failed, latencies


async def measure(server: Server, rnd: int, requests: list[Any], args: argparse.Namespace) -> Run:
    server.check_alive()
    # A local subchannel pool per channel: otherwise equal channels share one connection.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.aio.insecure_channel(server.address, options=options) for _ in range(args.conns)]
    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), START_TIMEOUT_S)
        stubs: list[SetCall] = [
            ch.unary_unary(
                METHOD,
                request_serializer=kv_pb2.SetRequest.SerializeToString,
                response_deserializer=kv_pb2.SetResponse.FromString,
                _registered_method=True,  # as the generated KVStub does
            )
            for ch in channels
        ]
        await closed_loop(stubs, requests[: args.warmup], args.concurrency)
        await cdc_drained(channels[0], server)
        cpu0, client0, t0 = server.cpu_seconds(), time.process_time(), time.perf_counter()
        failed, lat = await closed_loop(stubs, requests[args.warmup :], args.concurrency)
        seconds = time.perf_counter() - t0
        client_cpu = time.process_time() - client0
        # The server's CPU counts until its CDC publisher has had every event confirmed: a publisher
        # that lags behind the writes would otherwise catch up, unmeasured, in another server's turn.
        drain_s = await cdc_drained(channels[0], server)
        server_cpu = server.cpu_seconds() - cpu0
    finally:
        for ch in channels:
            await ch.close()
    server.check_alive()
    q = statistics.quantiles(lat, n=100, method="inclusive") if len(lat) > 1 else [math.nan] * 99
    n = args.requests
    return Run(server.name, rnd, len(lat), failed, seconds, len(lat) / seconds, q[49] * 1e3, q[98] * 1e3,
               server_cpu / n, client_cpu / n, drain_s)  # fmt: skip


async def cdc_drained(channel: grpc.aio.Channel, server: Server) -> float:
    """For a CDC node, wait until its publisher holds no event the broker has not confirmed (Info);
    returns the seconds waited (0 for the other servers)."""
    if server.name not in CDC_SERVERS.values():
        return 0.0
    info = kv_pb2_grpc.KVStub(channel).Info
    start = time.perf_counter()
    while (await info(kv_pb2.InfoRequest(), timeout=CALL_TIMEOUT_S)).cdc.queue_depth:
        await asyncio.sleep(CDC_DRAIN_POLL_S)
    return time.perf_counter() - start


def summarize(runs: list[Run], name: str) -> dict[str, Any]:
    mine = [r for r in runs if r.server == name]
    mid = sorted(mine, key=lambda r: r.qps)[(len(mine) - 1) // 2]  # the median round (lower one if even)
    return {
        "best_qps": max(r.qps for r in mine),
        "median_qps": statistics.median(r.qps for r in mine),
        # Writes per second until the broker confirmed them all (the same as QPS without CDC).
        "median_published_qps": statistics.median(r.ok / (r.seconds + r.cdc_drain_s) for r in mine),
        "p50_ms": mid.p50_ms,
        "p99_ms": mid.p99_ms,
        "failed": sum(r.failed for r in mine),
        "server_cpu_s_per_req": statistics.median(r.server_cpu_s_per_req for r in mine),
    }


ROUND_COLS = (-6, -14, 9, 9, 9, 16, 16, 8, 9)  # widths; negative: left-aligned
SUMMARY_COLS = (-14, 10, 12, 9, 9, 16, 8)


def row(widths: tuple[int, ...], *cells: object) -> str:
    return "".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))


async def bench(servers: list[Server], requests: list[Any], args: argparse.Namespace) -> list[Run]:
    runs: list[Run] = []
    print(
        "\n"
        + row(
            ROUND_COLS,
            "round",
            "server",
            "QPS",
            "p50 ms",
            "p99 ms",
            "srv CPU µs/req",
            "cli CPU µs/req",
            "failed",
            "drain s",
        )
    )
    for rnd in range(1, args.rounds + 1):
        for server in servers:  # alternate: reference, fluxkv, reference, fluxkv, ...
            r = await measure(server, rnd, requests, args)
            runs.append(r)
            cpu, cli = r.server_cpu_s_per_req * 1e6, r.client_cpu_s_per_req * 1e6
            print(row(ROUND_COLS, rnd, r.server, f"{r.qps:.0f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}", f"{cpu:.1f}",
                      f"{cli:.1f}", r.failed, f"{r.cdc_drain_s:.2f}"), flush=True)  # fmt: skip
    return runs


def report(info: dict[str, Any], args: argparse.Namespace, runs: list[Run]) -> None:
    summaries = {name: summarize(runs, name) for name in dict.fromkeys(r.server for r in runs)}
    ref, kv = summaries["reference"], summaries["fluxkv"]
    ratio = kv["median_qps"] / ref["median_qps"]
    cpu_ratio = kv["server_cpu_s_per_req"] / ref["server_cpu_s_per_req"] if ref["server_cpu_s_per_req"] else None
    print("\n" + row(SUMMARY_COLS, "server", "best QPS", "median QPS", "p50 ms", "p99 ms", "srv CPU µs/req", "failed"))
    for name, s in summaries.items():
        cpu = s["server_cpu_s_per_req"] * 1e6
        print(row(SUMMARY_COLS, name, f"{s['best_qps']:.0f}", f"{s['median_qps']:.0f}", f"{s['p50_ms']:.2f}",
                  f"{s['p99_ms']:.2f}", f"{cpu:.1f}", s["failed"]))  # fmt: skip
    print("(p50/p99 of each server's median round; CPU per request: median over rounds)")
    cpu_text = f"{cpu_ratio:.2f}x the reference's" if cpu_ratio is not None else "n/a"
    print(f"\nratio fluxkv/reference (median QPS): {ratio:.2f}   fluxkv server CPU per request: {cpu_text}")
    base = summaries.get(BASELINE)
    base_ratio = kv["median_qps"] / base["median_qps"] if base else None
    base_cpu_ratio = kv["server_cpu_s_per_req"] / base["server_cpu_s_per_req"] if base else None
    if base:
        per_round = [k.qps / b.qps for k, b in zip(*(
            [r for r in runs if r.server == name] for name in ("fluxkv", BASELINE)), strict=True)]  # fmt: skip
        rounds = " ".join(f"{x:.2f}" for x in per_round)
        print(f"ratio fluxkv/baseline (median QPS): {base_ratio:.2f}   server CPU per request: "
              f"{base_cpu_ratio:.2f}x the baseline's   per round: {rounds}")  # fmt: skip
    ratios: dict[str, float] = {}
    for fmt, name in CDC_SERVERS.items():
        if name in summaries:
            ratios[fmt] = print_ratio(summaries, runs, name, "fluxkv", f"CDC on ({fmt})/CDC off")
    fk_ratio = None
    if len(ratios) == len(CDC_SERVERS):
        fk_ratio = print_ratio(summaries, runs, CDC_SERVERS["flux-kv"], CDC, "flux-kv/fluxkv format")
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"load average at the end: {info['loadavg_end']} (other work on the machine shows here)")
    if args.json:
        line = {
            "bench": "unary_set",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": info,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "json"},
            "reference": ref,
            "fluxkv": kv,
            "ratio_median_qps": ratio,
            "ratio_server_cpu_per_req": cpu_ratio,
            "cdc": summaries.get(CDC),
            "ratio_cdc_on_off_median_qps": ratios.get("fluxkv"),
            "cdc_flux_kv": summaries.get(CDC_SERVERS["flux-kv"]),
            "ratio_cdc_flux_kv_on_off_median_qps": ratios.get("flux-kv"),
            "ratio_flux_kv_fluxkv_median_qps": fk_ratio,
            "baseline": base,
            "baseline_commit": checkout_commit(args.baseline) if args.baseline else None,
            "ratio_baseline_median_qps": base_ratio,
            "ratio_baseline_server_cpu_per_req": base_cpu_ratio,
            "runs": [asdict(r) for r in runs],
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            f.write(json.dumps(line) + "\n")


def print_ratio(summaries: dict[str, Any], runs: list[Run], name: str, against: str, what: str) -> float:
    """Print server `name` against server `against`: the ratio of median QPS, each round's, and the
    difference in server CPU per request; return the ratio."""
    ratio = float(summaries[name]["median_qps"] / summaries[against]["median_qps"])
    per_round = [a.qps / b.qps for a, b in zip(*(
        [r for r in runs if r.server == n] for n in (name, against)), strict=True)]  # fmt: skip
    cpu = (summaries[name]["server_cpu_s_per_req"] - summaries[against]["server_cpu_s_per_req"]) * 1e6
    published = summaries[name]["median_published_qps"] / summaries[against]["median_published_qps"]
    print(f"ratio {what} (median QPS): {ratio:.2f}   per round: " + " ".join(f"{x:.2f}" for x in per_round)
          + f"   counting the CDC drain: {published:.2f}   server CPU per request: {cpu:+.1f} µs")  # fmt: skip
    return ratio


async def delete_cdc_objects(url: str, name: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(name)
        await channel.exchange_delete(name)


def checkout_commit(checkout: Path) -> str:
    """The short commit of a git checkout, or "unknown" (say, an exported tree)."""
    result = subprocess.run(
        ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    )
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    p = argparse.ArgumentParser(description="Unary Set QPS of a FluxKV node against a no-op server on its gRPC server.")
    p.add_argument("-c", "--concurrency", type=int, default=50, help="requests in flight (default 50)")
    p.add_argument("-n", "--requests", type=int, default=20000, help="measured requests per round and server")
    p.add_argument("--warmup", type=int, default=1000, help="unmeasured requests before each measurement")
    p.add_argument("--conns", type=int, default=1, help="gRPC channels (connections) per server (default 1)")
    p.add_argument("-r", "--keyspace", type=int, default=10000, help="distinct keys (default 10000)")
    p.add_argument("-d", "--value-size", type=int, default=100, help="value size in bytes (default 100)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--cdc-url", metavar="AMQP_URL", help="also measure a node with CDC on, publishing to this broker")
    p.add_argument(
        "--cdc-format",
        action="append",
        choices=tuple(CDC_SERVERS),
        help="with --cdc-url: FLUX_CDC_FORMAT of the CDC node (default fluxkv); give both to measure one node of each",
    )
    p.add_argument(
        "--baseline",
        metavar="CHECKOUT",
        type=Path,
        help="also measure CHECKOUT/cmd/fluxkv-server (another checkout, e.g. `git worktree add /tmp/main main`)",
    )
    p.add_argument(
        "--grpc-server",
        choices=SERVERS,
        default="native",
        help="the gRPC server of the reference and of every node (FLUX_GRPC_SERVER; default native)",
    )
    p.add_argument("--json", metavar="FILE", help="append one JSON line with machine, settings and results")
    args = p.parse_args()
    cdc_formats = list(dict.fromkeys(args.cdc_format or ["fluxkv"]))
    if min(args.concurrency, args.requests, args.conns, args.keyspace, args.rounds) < 1 or args.warmup < 0:
        p.error("-c, -n, --conns, -r and --rounds must be at least 1, --warmup at least 0")
    if args.baseline and not (args.baseline / "cmd" / "fluxkv-server").is_file():
        p.error(f"--baseline: no {args.baseline / 'cmd' / 'fluxkv-server'}")

    rng = random.Random(1)  # the same keys in the same order for every run
    value = rng.randbytes(args.value_size)
    keys = [f"bench-{i:08d}" for i in range(args.keyspace)]
    requests = [kv_pb2.SetRequest(key=rng.choice(keys), value=value) for _ in range(args.warmup + args.requests)]
    info = machine()
    print(f"unary Set: a FluxKV node against a no-op reference, both on {VERSIONS[args.grpc_server]}, same client, "
          "alternating rounds")  # fmt: skip
    print(f"machine   {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), load {info['loadavg']}")
    print(f"software  Python {info['python']}, grpcio {info['grpcio']}, protobuf {info['protobuf']}, "
          f"fluxkv {info['commit']}")  # fmt: skip
    print(f"settings  {args.requests} requests after {args.warmup} warm-up, {args.concurrency} in flight, "
          f"{args.conns} connection(s), {args.keyspace} keys, {args.value_size}-byte values, "
          f"{args.rounds} round(s) per server")  # fmt: skip
    print(f"reference bench/noop_server.py: bare {VERSIONS[args.grpc_server]} server whose Set returns an empty "
          "SetResponse")  # fmt: skip
    cdc_names = f"fluxkv-bench-{uuid.uuid4().hex[:8]}"
    if args.cdc_url:
        print(f"CDC on    a node per format ({', '.join(cdc_formats)}) publishing to {args.cdc_url.split('@')[-1]}, "
              f"exchange and durable queue {cdc_names}-<format> each (deleted at the end)")  # fmt: skip
    if args.baseline:
        print(
            f"baseline  {args.baseline}/cmd/fluxkv-server (commit {checkout_commit(args.baseline)}), default settings"
        )
    print("client    this process: one asyncio loop, closed loop, on the same machine as the servers")

    signal.signal(signal.SIGTERM, interrupt)  # stop the servers on SIGTERM too
    servers: list[Server] = []
    try:
        noop = [sys.executable, str(ROOT / "bench" / "noop_server.py"), "--grpc-server", args.grpc_server]
        servers.append(Server("reference", noop))
        node = [sys.executable, str(ROOT / "cmd" / "fluxkv-server"), "--port", "0"]
        node_env = {**NODE_ENV, "FLUX_GRPC_SERVER": args.grpc_server}
        servers.append(Server("fluxkv", node, node_env))
        if args.baseline:
            servers.append(
                Server(
                    BASELINE, [sys.executable, str(args.baseline / "cmd" / "fluxkv-server"), "--port", "0"], node_env
                )
            )
        for fmt in cdc_formats if args.cdc_url else []:
            name = f"{cdc_names}-{fmt}"
            env = {"FLUX_RABBITMQ_URL": args.cdc_url, "FLUX_CDC_EXCHANGE": name, "FLUX_CDC_QUEUE": name}
            servers.append(Server(CDC_SERVERS[fmt], node, {**node_env, **env, "FLUX_CDC_FORMAT": fmt}))
        for s in servers:
            s.wait_ready()
        runs = asyncio.run(bench(servers, requests, args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as exc:  # a server did not start, died, or never became ready
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for s in servers:
            s.stop()
        for fmt in cdc_formats if args.cdc_url else []:
            asyncio.run(delete_cdc_objects(args.cdc_url, f"{cdc_names}-{fmt}"))
    report(info, args, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
