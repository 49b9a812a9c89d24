#!/usr/bin/env python3
"""What fluxkv-gateway costs against calling the node directly, in one run: one
node (10,000 keys of 100 B preloaded) and one gateway in front of it (rate limit
off), each its own process on a free loopback port. Per round, rounds interleaved
(the order reversed every other round): h2load's unary gRPC Get and Set against
the node (direct), and wrk's GET and POST /api/v1/kv of a random key through the
gateway, and a GET of one hot key (coalesced), at the same concurrency. Prints
requests/s, p50/p99, the CPU per request of the node, of the gateway and of the
client, and the ratios gateway / direct. Answers are checked before the loads, and
the node's revision against the writes sent after them.

    .venv/bin/python bench/gateway.py [--rounds 3] [--duration 10] [--calls 100000] [--quick] [--json FILE]

Needs h2load (Debian's nghttp2-client) and wrk. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import grpc
import orjson
import pygrpc_native

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from h2load import INSTALL as H2LOAD_INSTALL  # noqa: E402
from h2load import Call, append_record, h2load, revision  # noqa: E402
from unary_set import Server, interrupt, row  # noqa: E402
from wrk import INSTALL as WRK_INSTALL  # noqa: E402
from wrk import JSON_TYPE, request, wrk, wrk_script, wrk_version  # noqa: E402

from fluxkv.bench.load import key_name  # noqa: E402
from fluxkv.bench.report import machine  # noqa: E402
from fluxkv.proto import kv_pb2, kv_pb2_grpc  # noqa: E402
from fluxkv.server.grpc_transport import SERVERS  # noqa: E402

HOST = "127.0.0.1"
KEYS = 10_000
VALUE_SIZE = 100
PRELOAD_BATCH = 1_000
GET_KEY, SET_KEY, CHECK_KEY = key_name(0), key_name(1), key_name(2)  # the direct loads' keys (h2load sends one body)
MISSING = "missing"
DIRECT_GET, DIRECT_SET, GATEWAY_GET, GATEWAY_POST, GATEWAY_HOT = (
    "direct-get", "direct-set", "gateway-get", "gateway-post", "gateway-get-hot",
)  # fmt: skip
LOADS = (DIRECT_GET, DIRECT_SET, GATEWAY_GET, GATEWAY_POST, GATEWAY_HOT)
# Each gateway load and the direct one it is compared with.
PAIRS = ((GATEWAY_GET, DIRECT_GET), (GATEWAY_POST, DIRECT_SET), (GATEWAY_HOT, DIRECT_GET))


def preloaded_value(i: int) -> bytes:
    return f"{i:08d}".ljust(VALUE_SIZE, "v").encode()


def direct_calls() -> dict[str, Call]:
    set_request = kv_pb2.SetRequest(key=SET_KEY, value=b"v" * VALUE_SIZE)
    return {DIRECT_GET: Call("Get", kv_pb2.GetRequest(key=GET_KEY)), DIRECT_SET: Call("Set", set_request)}


@dataclass
class Run:
    requests: int
    errors: int  # h2load: calls not answered HTTP 200; wrk: socket errors and answers other than 2xx or 3xx
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    node_cpu_us_per_request: float
    gateway_cpu_us_per_request: float | None  # None for the direct loads, which the gateway does not see
    client_cpu_us_per_request: float  # h2load's or wrk's


class CheckFailed(RuntimeError):
    """An answer or the node's revision is not what the requests sent should give."""


def start(grpc_server: str, concurrency: int) -> tuple[Server, Server]:
    """The node, preloaded, then the gateway in front of it; both ready."""
    common = {"FLUX_SERVER_HOST": HOST}
    node = Server(
        "node",
        [sys.executable, str(ROOT / "cmd" / "fluxkv-server"), "--port", "0", "--admin-port", "off"],
        {**common, "FLUX_GRPC_SERVER": grpc_server},
    )
    try:
        node.wait_ready()
        preload(node.address)
        gateway_env = {
            **common,
            "FLUX_GATEWAY_NODES": node.address,
            "FLUX_GATEWAY_PORT": "0",
            "FLUX_GATEWAY_RATE_LIMIT": "0",
            # wrk's connections, and as many again still being answered when a run ends and the next begins.
            "FLUX_GATEWAY_MAX_IN_FLIGHT": str(2 * concurrency),
        }
        gateway = Server("gateway", [sys.executable, str(ROOT / "cmd" / "fluxkv-gateway")], gateway_env)
        try:
            gateway.wait_ready()
        except BaseException:
            gateway.stop()
            raise
    except BaseException:
        node.stop()
        raise
    return node, gateway


def preload(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = kv_pb2_grpc.KVStub(channel)
        for first in range(0, KEYS, PRELOAD_BATCH):
            items = [kv_pb2.SetRequest(key=key_name(i), value=preloaded_value(i))
                     for i in range(first, min(KEYS, first + PRELOAD_BATCH))]  # fmt: skip
            stub.MultiSet(kv_pb2.MultiSetRequest(items=items), timeout=30)


def direct_get(address: str, key: str) -> kv_pb2.GetResponse:
    with grpc.insecure_channel(address) as channel:
        response: kv_pb2.GetResponse = kv_pb2_grpc.KVStub(channel).Get(kv_pb2.GetRequest(key=key), timeout=10)
        return response


def check_answers(node: str, gateway: str) -> None:
    """A preloaded key reads back directly and through the gateway, a missing key is not found (404), and
    a POST through the gateway is read back directly. Else CheckFailed."""
    got = direct_get(node, GET_KEY)
    if not got.found or got.value != preloaded_value(0):
        raise CheckFailed(f"direct Get of {GET_KEY}: found={got.found} value={got.value!r}")
    if direct_get(node, MISSING).found:
        raise CheckFailed(f"direct Get of {MISSING!r} found it")
    status, content_type, body = request(gateway, "GET", f"?key={GET_KEY}")
    answer = orjson.loads(body) if content_type.startswith(JSON_TYPE) else None
    if status != 200 or answer is None or answer.get("value") != preloaded_value(0).decode():
        raise CheckFailed(f"gateway GET of {GET_KEY}: {status} {body!r}")
    status, _, body = request(gateway, "GET", f"?key={MISSING}")
    if status != 404:
        raise CheckFailed(f"gateway GET of {MISSING!r}: {status} {body!r}, expected 404")
    value = "checked".ljust(VALUE_SIZE, "v")
    status, _, body = request(gateway, "POST", body=orjson.dumps({"key": CHECK_KEY, "value": value}))
    got = direct_get(node, CHECK_KEY)
    if status != 200 or got.value != value.encode():
        raise CheckFailed(f"gateway POST of {CHECK_KEY}: {status} {body!r}; read back directly: {got.value!r}")


class Bench:
    """The loads against one node and its gateway, and the writes they sent (for the revision check)."""

    def __init__(self, args: argparse.Namespace, node: Server, gateway: Server, scripts: dict[str, Path]) -> None:
        self.args, self.node, self.gateway, self.scripts = args, node, gateway, scripts
        self.calls = direct_calls()
        self.wrk = shutil.which("wrk") or "wrk"
        self.direct_sets = 0  # every one applied: h2load waits for each answer
        self.posts_ok = 0  # answered 200: applied
        self.posts_unsure = 0  # answered otherwise, failed, or in flight when wrk stopped: applied or not

    def run(self, load: str, warmup: bool = False) -> Run:
        args = self.args
        if load in self.calls:
            calls = args.calls // 10 if warmup else args.calls
            streams = args.concurrency // args.h2load_connections
            r = h2load([self.node.address], calls, args.h2load_connections, streams, VALUE_SIZE, self.node.proc.pid,
                       call=self.calls[load])  # fmt: skip
            self.node.check_alive()
            if load == DIRECT_SET:
                self.direct_sets += r.calls
            return Run(r.calls, r.calls - r.succeeded, r.seconds, r.calls_per_s, r.p50_ms, r.p99_ms,
                       r.server_cpu_us_per_call, None, r.client_cpu_us_per_call)  # fmt: skip
        duration = args.warmup if warmup else args.duration
        pids = {"node": self.node.proc.pid, "gateway": self.gateway.proc.pid}
        w = wrk(self.wrk, self.gateway.address, self.scripts[load], args.threads, args.concurrency, duration, pids)
        self.gateway.check_alive()
        self.node.check_alive()
        errors = w.socket_errors + w.status_errors
        if load == GATEWAY_POST:
            self.posts_ok += w.requests - w.status_errors
            self.posts_unsure += errors + args.concurrency
        cpu = w.cpu_us_per_request
        return Run(w.requests, errors, w.seconds, w.requests_per_s, w.p50_ms, w.p99_ms, cpu["node"], cpu["gateway"],
                   w.client_cpu_us_per_request)  # fmt: skip


def check_revision(node: str, base: int, bench: Bench) -> str:
    """The node's revision against the writes sent since `base` (the preload's and the check's revision), read
    once the gateway has stopped (its writes in flight finished). Returns the verdict; CheckFailed if wrong."""
    got = revision(node) - base
    low = bench.direct_sets + bench.posts_ok
    high = low + bench.posts_unsure
    verdict = (f"{got} writes applied: {bench.direct_sets} direct Sets and {bench.posts_ok} POSTs answered 200, "
               f"and at most {bench.posts_unsure} POSTs answered otherwise or cut off when wrk stopped")  # fmt: skip
    if not low <= got <= high:
        raise CheckFailed(f"node revision: {verdict}")
    return verdict


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda r: r.requests_per_s)[(len(runs) - 1) // 2]


def summarize(runs: dict[str, list[Run]]) -> dict[str, Any]:
    """Each load's median round (by requests/s); per pair, the median over rounds (and range) of the gateway's
    requests/s over the direct load's in the same round, of the added p50 and p99, and the CPU per request."""
    figures = {load: asdict(median_run(rs)) for load, rs in runs.items()}
    pairs = {}
    for through, direct in PAIRS:
        if through not in runs:
            continue
        a, b = runs[through], runs[direct]
        per_round = {
            "requests_per_s": [x.requests_per_s / y.requests_per_s for x, y in zip(a, b, strict=True)],
            "added_p50_ms": [x.p50_ms - y.p50_ms for x, y in zip(a, b, strict=True)],
            "added_p99_ms": [x.p99_ms - y.p99_ms for x, y in zip(a, b, strict=True)],
            "gateway_cpu_us_per_request": [x.gateway_cpu_us_per_request or 0.0 for x in a],
            "node_cpu_us_per_request": [x.node_cpu_us_per_request for x in a],
            "direct_node_cpu_us_per_request": [y.node_cpu_us_per_request for y in b],
        }
        pairs[f"{through}/{direct}"] = {
            name: {"median": statistics.median(v), "range": [min(v), max(v)]} for name, v in per_round.items()
        }
    return {"loads": figures, "pairs": pairs}


def report(info: dict[str, Any], args: argparse.Namespace, summary: dict[str, Any], checks: dict[str, str]) -> None:
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores (nproc {info['usable_cores']}), load average "
          f"{info['loadavg']} at the start, {info['loadavg_end']} at the end; Python {info['python']}, "
          f"commit {info['commit']}")  # fmt: skip
    print("versions: " + ", ".join(f"{name} {v}" for name, v in info["versions"].items()))
    streams = args.concurrency // args.h2load_connections
    print(f"compared: one node on {args.grpc_server} ({KEYS:,} keys of {VALUE_SIZE} B) called directly by h2load "
          f"(unary gRPC, {args.h2load_connections} connections x {streams} streams, {args.calls:,} calls of one key "
          f"per round), against fluxkv-gateway in front of it (rate limit off) loaded by {info['wrk']} (HTTP/1.1 "
          f"keep-alive, {args.threads} threads, {args.concurrency} connections, {args.duration} s per round; a random "
          f"key; hot: one key); {args.rounds} rounds interleaved")  # fmt: skip
    widths = (-16, 10, 8, 8, 9, 11, 10, 7)
    print("\n" + row(widths, "load", "req/s", "p50 ms", "p99 ms", "node µs", "gateway µs", "client µs", "errors"))
    for load, m in summary["loads"].items():
        gateway = "-" if m["gateway_cpu_us_per_request"] is None else f"{m['gateway_cpu_us_per_request']:.0f}"
        print(row(widths, load, f"{m['requests_per_s']:,.0f}", f"{m['p50_ms']:.2f}", f"{m['p99_ms']:.2f}",
                  f"{m['node_cpu_us_per_request']:.0f}", gateway, f"{m['client_cpu_us_per_request']:.0f}",
                  m["errors"]))  # fmt: skip
    print("(median round by requests/s; µs: CPU per request of the node, the gateway and the client, h2load or wrk)\n")
    for name, p in summary["pairs"].items():
        rps, p50, p99 = p["requests_per_s"], p["added_p50_ms"], p["added_p99_ms"]
        print(f"{name}: {rps['median']:.2f}x the requests/s (rounds {rps['range'][0]:.2f}-{rps['range'][1]:.2f}); "
              f"added p50 {p50['median']:+.2f} ms, p99 {p99['median']:+.2f} ms; gateway "
              f"{p['gateway_cpu_us_per_request']['median']:.0f} µs of CPU per request, node "
              f"{p['node_cpu_us_per_request']['median']:.0f} µs behind it against "
              f"{p['direct_node_cpu_us_per_request']['median']:.0f} called directly")  # fmt: skip
    print("(medians over rounds of each round's ratio or difference)\n")
    for name, check in checks.items():
        print(f"{name}: {check}")


def main_bench(args: argparse.Namespace) -> int:
    for tool, install in (("h2load", H2LOAD_INSTALL), ("wrk", WRK_INSTALL)):
        if shutil.which(tool) is None:
            print(f"{tool} is not on PATH (Debian: {install})", file=sys.stderr)
            return 1
    info = machine()
    info["wrk"] = wrk_version(shutil.which("wrk") or "wrk")
    info["versions"] = {"pygrpc-native": pygrpc_native.__version__, "grpcio": grpc.__version__}
    info["versions"] |= {name: version(name) for name in ("starlette", "uvicorn", "httptools", "uvloop")}
    loads = [load for load in LOADS if load != GATEWAY_HOT or not args.no_hot]
    runs: dict[str, list[Run]] = {load: [] for load in loads}
    checks: dict[str, str] = {}
    node, gateway = start(args.grpc_server, args.concurrency)
    try:
        check_answers(node.address, gateway.address)
        checks["answers"] = "a preloaded key read directly and through the gateway, a missing one 404, a POST read back"
        base = revision(node.address)
        with tempfile.TemporaryDirectory(prefix="fluxkv-gateway-bench-") as tmp:
            keys = [key_name(i) for i in range(KEYS)]
            scripts = {
                GATEWAY_GET: wrk_script(Path(tmp), GATEWAY_GET, "get", keys, VALUE_SIZE),
                GATEWAY_POST: wrk_script(Path(tmp), GATEWAY_POST, "post", keys, VALUE_SIZE),
                GATEWAY_HOT: wrk_script(Path(tmp), GATEWAY_HOT, "get", [GET_KEY], VALUE_SIZE),
            }
            bench = Bench(args, node, gateway, scripts)
            if args.warmup:
                for load in loads:
                    bench.run(load, warmup=True)
            for rnd in range(args.rounds):
                for load in loads if rnd % 2 == 0 else loads[::-1]:
                    run = bench.run(load)
                    runs[load].append(run)
                    cpu = f"node {run.node_cpu_us_per_request:4.0f} µs"
                    if run.gateway_cpu_us_per_request is not None:
                        cpu += f", gateway {run.gateway_cpu_us_per_request:4.0f} µs"
                    print(f"round {rnd + 1}  {load:<16} {run.requests_per_s:>9,.0f} req/s  {cpu} of CPU per request"
                          + (f"  {run.errors} ERRORS" if run.errors else ""), flush=True)  # fmt: skip
        gateway.stop()
        checks["revision"] = check_revision(node.address, base, bench)
    except CheckFailed as e:
        print(f"check FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        gateway.stop()
        node.stop()
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    errors = sum(r.errors for rs in runs.values() for r in rs)
    checks["errors"] = str(errors)
    summary = summarize(runs)
    report(info, args, summary, checks)
    if args.json:
        append_record(args.json, "gateway", info, args, runs, checks, summary=summary)
    if errors:
        print(f"{errors} requests FAILED (socket errors, time-outs or error statuses): see the rounds above")
        return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=3, help="rounds, each running every load once (default 3)")
    p.add_argument("--duration", type=int, default=10, help="seconds per gateway load and round (default 10)")
    p.add_argument("--calls", type=int, default=100_000, help="calls per direct load and round (default 100000)")
    p.add_argument("--warmup", type=int, default=2,
                   help="seconds per gateway load first, not measured, and a tenth of --calls per direct load; "
                        "0: none (default 2)")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=50,
                   help="requests in flight: wrk's connections, h2load's connections x streams (50)")  # fmt: skip
    p.add_argument("--h2load-connections", type=int, default=2, help="h2load's connections (default 2)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--grpc-server", choices=SERVERS, default="native", help="the node's gRPC server (default native)")
    p.add_argument("--no-hot", action="store_true", help="leave out the GET of one hot key through the gateway")
    p.add_argument("--quick", action="store_true", help="1 round of 1 s and 2,000 calls per load: checks it works")
    p.add_argument("--json", metavar="FILE", help="append the result to FILE as one JSON line")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.duration, args.calls, args.warmup = 1, 1, 2_000, 0
    if args.concurrency % args.h2load_connections:
        p.error("--concurrency must be a multiple of --h2load-connections")
    signal.signal(signal.SIGTERM, interrupt)
    try:
        return main_bench(args)
    except KeyboardInterrupt:  # the node and the gateway were stopped on the way out
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
