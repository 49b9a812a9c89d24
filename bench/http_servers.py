#!/usr/bin/env python3
"""The HTTP servers measured for fluxkv-gateway and the nodes' admin port: the same
two routes (GET and POST /api/v1/kv over an in-memory dict of 10,000 keys, JSON by
orjson everywhere) served by Starlette on uvicorn (httptools, uvloop), aiohttp.web
on uvloop, Starlette on granian, litestar on uvicorn, and a bare ASGI callable on
uvicorn (the floor without a framework), each its own process on a free loopback
port. wrk (HTTP/1.1, keep-alive) loads each in turn, rounds interleaved, after a
check that every candidate answers the same bodies; this prints requests/s,
latency, server and client CPU per request, and each candidate's ratio to
Starlette on uvicorn in the same run.

    .venv/bin/python bench/http_servers.py [--rounds 3] [--duration 10] [--quick] [--json FILE]

Needs wrk (Debian's wrk) and the http-candidates extra. See bench/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import orjson
import uvicorn
import uvloop
from aiohttp import web
from litestar import Litestar
from litestar import Request as LitestarRequest
from litestar import Response as LitestarResponse
from litestar import get as litestar_get
from litestar import post as litestar_post
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from h2load import append_record  # noqa: E402
from unary_set import Server, interrupt, row  # noqa: E402
from wrk import INSTALL, JSON_TYPE, PATH, request, wrk_script, wrk_version  # noqa: E402
from wrk import wrk as run_wrk  # noqa: E402

from deploy.private_servers import free_port  # noqa: E402
from fluxkv.bench.load import key_name  # noqa: E402
from fluxkv.bench.report import machine  # noqa: E402

HOST = "127.0.0.1"
KEYS = 10_000
VALUE_SIZE = 100
STARLETTE_UVICORN, AIOHTTP, STARLETTE_GRANIAN, LITESTAR_UVICORN, ASGI_UVICORN = (
    "starlette-uvicorn", "aiohttp", "starlette-granian", "litestar-uvicorn", "asgi-uvicorn",
)  # fmt: skip
CANDIDATES = (STARLETTE_UVICORN, AIOHTTP, STARLETTE_GRANIAN, LITESTAR_UVICORN, ASGI_UVICORN)
BASE = STARLETTE_UVICORN
LOADS = ("get", "post")
PACKAGES = ("starlette", "uvicorn", "httptools", "uvloop", "aiohttp", "granian", "litestar", "orjson")


def preloaded_value(i: int) -> str:
    return f"{i:08d}".ljust(VALUE_SIZE, "v")


class Store:
    """The logic every candidate serves, to the byte: each framework only carries the key or the body in and
    the status and JSON body out."""

    def __init__(self) -> None:
        self.items = {key_name(i): (preloaded_value(i), i + 1) for i in range(KEYS)}
        self.revision = KEYS

    def get(self, key: str | None) -> tuple[int, bytes]:
        if key is None:
            return 400, orjson.dumps({"error": "the key query parameter is required"})
        item = self.items.get(key)
        if item is None:
            return 404, orjson.dumps({"error": f"no key {key}"})
        return 200, orjson.dumps({"key": key, "value": item[0], "revision": item[1]})

    def set(self, body: bytes) -> tuple[int, bytes]:
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            return 400, orjson.dumps({"error": "the body is not JSON"})
        key, value = (doc.get("key"), doc.get("value")) if isinstance(doc, dict) else (None, None)
        if not isinstance(key, str) or not isinstance(value, str):
            return 400, orjson.dumps({"error": "the body needs a string key and a string value"})
        self.revision += 1
        self.items[key] = (value, self.revision)
        return 200, orjson.dumps({"key": key, "revision": self.revision})


def starlette_app(store: Store) -> Starlette:
    async def kv_get(request: Request) -> Response:
        status, body = store.get(request.query_params.get("key"))
        return Response(body, status, media_type=JSON_TYPE)

    async def kv_set(request: Request) -> Response:
        status, body = store.set(await request.body())
        return Response(body, status, media_type=JSON_TYPE)

    return Starlette(routes=[Route(PATH, kv_get, methods=["GET"]), Route(PATH, kv_set, methods=["POST"])])


def granian_app() -> Starlette:
    """granian's factory (--factory): the socket is listening by the time granian starts its worker, so the
    worker announces it, from granian's own settings, as the parent waits for."""
    print(f"serving on {os.environ['GRANIAN_HOST']}:{os.environ['GRANIAN_PORT']}", file=sys.stderr, flush=True)
    return starlette_app(Store())


def litestar_app(store: Store) -> Litestar:
    @litestar_get(PATH)
    async def kv_get(key: str | None = None) -> LitestarResponse[bytes]:
        status, body = store.get(key)
        return LitestarResponse(body, status_code=status, media_type=JSON_TYPE)

    @litestar_post(PATH, status_code=200)
    async def kv_set(request: LitestarRequest[Any, Any, Any]) -> LitestarResponse[bytes]:
        status, body = store.set(await request.body())
        return LitestarResponse(body, status_code=status, media_type=JSON_TYPE)

    return Litestar(route_handlers=[kv_get, kv_set])


def asgi_app(store: Store) -> Any:
    """The same routes on the bare ASGI interface: what uvicorn costs without a framework."""
    headers = [(b"content-type", JSON_TYPE.encode())]
    not_found = orjson.dumps({"error": "not found"})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":  # no lifespan to handle
            return
        if scope["path"] != PATH or scope["method"] not in ("GET", "POST"):
            status, body = 404, not_found
        elif scope["method"] == "GET":
            status, body = store.get(dict(parse_qsl(scope["query_string"].decode("latin-1"))).get("key"))
        else:
            chunks, more = [], True
            while more:
                message = await receive()
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            status, body = store.set(b"".join(chunks))
        length = (b"content-length", str(len(body)).encode())
        await send({"type": "http.response.start", "status": status, "headers": [*headers, length]})
        await send({"type": "http.response.body", "body": body})

    return app


def aiohttp_app(store: Store) -> web.Application:
    async def kv_get(request: web.Request) -> web.Response:
        status, body = store.get(request.query.get("key"))
        return web.Response(body=body, status=status, content_type=JSON_TYPE)

    async def kv_set(request: web.Request) -> web.Response:
        status, body = store.set(await request.read())
        return web.Response(body=body, status=status, content_type=JSON_TYPE)

    app = web.Application()
    app.router.add_get(PATH, kv_get)
    app.router.add_post(PATH, kv_set)
    return app


def listen() -> socket.socket:
    """A listening socket on a free loopback port, announced as the parent waits for: a connection made before
    the server accepts waits in the backlog."""
    sock = socket.socket()
    sock.bind((HOST, 0))
    sock.listen(1024)
    print(f"serving on {HOST}:{sock.getsockname()[1]}", file=sys.stderr, flush=True)
    return sock


def serve(candidate: str) -> None:
    """Run one candidate in this process until SIGTERM or SIGINT."""
    if candidate == AIOHTTP:
        web.run_app(aiohttp_app(Store()), sock=listen(), access_log=None, print=None, loop=uvloop.new_event_loop())
        return
    apps = {STARLETTE_UVICORN: starlette_app, LITESTAR_UVICORN: litestar_app, ASGI_UVICORN: asgi_app}
    config = uvicorn.Config(
        apps[candidate](Store()), http="httptools", ws="none", lifespan="auto", access_log=False, log_level="warning"
    )
    # Server.serve() in a loop of our own, as the node and the gateway embed it.
    uvloop.run(uvicorn.Server(config).serve(sockets=[listen()]))


def start(candidate: str) -> Server:
    if candidate != STARLETTE_GRANIAN:
        return Server(candidate, [sys.executable, str(Path(__file__).resolve()), "--serve", candidate])
    granian = Path(sys.executable).with_name("granian")
    argv = [str(granian), "--interface", "asgi", "--workers", "1", "--runtime-threads", "1", "--no-ws",
            "--log-level", "warning", "--working-dir", str(BENCH), "--factory", "http_servers:granian_app"]  # fmt: skip
    return Server(candidate, argv, {"GRANIAN_HOST": HOST, "GRANIAN_PORT": str(free_port())})


class CheckFailed(RuntimeError):
    """A candidate answered otherwise than the logic they all serve."""


def check(server: Server) -> None:
    """A known key, a missing one, and a POST then a GET of what it wrote: the same statuses and bodies as
    the Store answers by itself, else CheckFailed."""
    expected = Store()
    known, written = key_name(0), key_name(1)
    post_body = orjson.dumps({"key": written, "value": "checked"})
    cases = [
        ("GET known key", "GET", f"?key={known}", None, expected.get(known)),
        ("GET missing key", "GET", "?key=missing", None, expected.get("missing")),
        ("POST", "POST", "", post_body, expected.set(post_body)),
        ("GET after POST", "GET", f"?key={written}", None, expected.get(written)),
    ]
    for label, method, query, body, (status, answer) in cases:
        got_status, got_type, got = request(server.address, method, query, body)
        if (got_status, got) != (status, answer) or not got_type.startswith(JSON_TYPE):
            raise CheckFailed(
                f"{server.name}: {label} answered {got_status} {got_type!r} {got!r}, expected {status} {answer!r}"
            )


@dataclass
class WrkRun:
    requests: int
    errors: int  # socket errors, time-outs and answers other than 2xx or 3xx
    seconds: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    server_cpu_us_per_request: float
    client_cpu_us_per_request: float  # wrk's


def wrk(tool: str, server: Server, script: Path, args: argparse.Namespace, duration: int) -> WrkRun:
    """One wrk run of `duration` seconds against `server` (and its descendants: granian's worker)."""
    figures = run_wrk(tool, server.address, script, args.threads, args.connections, duration,
                      {"server": server.proc.pid})  # fmt: skip
    server.check_alive()
    return WrkRun(
        requests=figures.requests,
        errors=figures.socket_errors + figures.status_errors,
        seconds=figures.seconds,
        requests_per_s=figures.requests_per_s,
        p50_ms=figures.p50_ms,
        p99_ms=figures.p99_ms,
        server_cpu_us_per_request=figures.cpu_us_per_request["server"],
        client_cpu_us_per_request=figures.client_cpu_us_per_request,
    )


def median_run(runs: list[WrkRun]) -> WrkRun:
    return sorted(runs, key=lambda r: r.requests_per_s)[(len(runs) - 1) // 2]


RATIO_FIELDS = ("requests_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_request")


def summarize(runs: dict[str, list[WrkRun]], candidates: list[str]) -> dict[str, dict[str, Any]]:
    """Per load and candidate: the median round's figures, and the median over rounds of each figure's ratio
    to BASE's in the same round (with the range of the requests/s ratio)."""
    summary: dict[str, dict[str, Any]] = {}
    for load in LOADS:
        summary[load] = {}
        for candidate in candidates:
            mine, base = runs[f"{candidate}/{load}"], runs.get(f"{BASE}/{load}")
            entry: dict[str, Any] = asdict(median_run(mine))
            if base is not None:
                ratios = {f: [getattr(a, f) / getattr(b, f) for a, b in zip(mine, base, strict=True)]
                          for f in RATIO_FIELDS}  # fmt: skip
                rps = ratios["requests_per_s"]
                entry["vs_base"] = {f: statistics.median(rs) for f, rs in ratios.items()}
                entry["vs_base"]["requests_per_s_range"] = [min(rps), max(rps)]
            summary[load][candidate] = entry
    return summary


def report(info: dict[str, Any], args: argparse.Namespace, summary: dict[str, dict[str, Any]]) -> None:
    start, end = info["loadavg"], info["loadavg_end"]
    print(f"machine: {info['cpu']}, {info['cores']} cores, load average {start} at the start, {end} at the end; "
          f"Python {info['python']}, commit {info['commit']}")  # fmt: skip
    print("versions: " + ", ".join(f"{name} {v}" for name, v in info["versions"].items()))
    print(f"load: {info['wrk']}, HTTP/1.1 keep-alive, {args.threads} threads, {args.connections} connections, "
          f"{args.duration} s per load and candidate, {args.rounds} rounds interleaved; GET: a random key of "
          f"{KEYS:,}; POST: a random key with a {VALUE_SIZE}-byte value")  # fmt: skip
    widths = (-19, 10, 8, 8, 8, 8, 8, 10, 8, 10)
    for load in LOADS:
        print(f"\n{load.upper()} {PATH}  (median round by requests/s; x: median over rounds of the ratio to {BASE})")
        print(row(widths, "candidate", "req/s", "x", "p50 ms", "x", "p99 ms", "x", "server µs", "x", "client µs"))
        for candidate, m in summary[load].items():
            vs = m.get("vs_base", {})
            ratio = {f: f"{vs[f]:.2f}" if f in vs else "-" for f in RATIO_FIELDS}
            print(row(widths, candidate, f"{m['requests_per_s']:,.0f}", ratio["requests_per_s"],
                      f"{m['p50_ms']:.2f}", ratio["p50_ms"], f"{m['p99_ms']:.2f}", ratio["p99_ms"],
                      f"{m['server_cpu_us_per_request']:.0f}", ratio["server_cpu_us_per_request"],
                      f"{m['client_cpu_us_per_request']:.0f}"))  # fmt: skip
    print("\nserver µs and client µs: CPU per request of the server process (and its workers) and of wrk")


def main_bench(args: argparse.Namespace) -> int:
    tool = shutil.which("wrk")
    if tool is None:
        print(f"wrk is not on PATH (Debian: {INSTALL})", file=sys.stderr)
        return 1
    info = machine()
    info["versions"] = {name: version(name) for name in PACKAGES}
    info["wrk"] = wrk_version(tool)
    candidates = args.candidate or list(CANDIDATES)
    started: list[Server] = []
    runs: dict[str, list[WrkRun]] = {f"{c}/{load}": [] for c in candidates for load in LOADS}
    errors = 0
    try:
        started = [start(c) for c in candidates]
        for server in started:
            server.wait_ready()
        for server in started:
            check(server)
        print(f"checked: {', '.join(candidates)} answer the same statuses and bodies", flush=True)
        with tempfile.TemporaryDirectory(prefix="fluxkv-http-servers-") as tmp:
            keys = [key_name(i) for i in range(KEYS)]
            scripts = {load: wrk_script(Path(tmp), load, load, keys, VALUE_SIZE) for load in LOADS}
            if args.warmup:
                for server in started:
                    wrk(tool, server, scripts["get"], args, args.warmup)
            for rnd in range(1, args.rounds + 1):
                for load in LOADS:
                    for server in started:
                        run = wrk(tool, server, scripts[load], args, args.duration)
                        runs[f"{server.name}/{load}"].append(run)
                        errors += run.errors
                        print(f"round {rnd}  {load:<4} {server.name:<18} {run.requests_per_s:>9,.0f} req/s  "
                              f"{run.server_cpu_us_per_request:5.0f} µs server CPU per request"
                              + (f"  {run.errors} ERRORS" if run.errors else ""), flush=True)  # fmt: skip
    except CheckFailed as e:
        print(f"check FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        for server in started:
            server.stop()
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    summary = summarize(runs, candidates)
    report(info, args, summary)
    checks = {"answers": "every candidate answered the same statuses and bodies", "errors": str(errors)}
    if args.json:
        append_record(args.json, "http_servers", info, args, runs, checks, summary=summary)
    if errors:
        print(f"{errors} requests FAILED (socket errors, time-outs or error statuses): see the rounds above")
        return 1
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=3, help="rounds, each loading every candidate once (default 3)")
    p.add_argument("--duration", type=int, default=10, help="seconds per load, candidate and round (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="seconds of GET per candidate first, not measured (default 2)")
    p.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections, kept alive (default 50)")
    p.add_argument("--candidate", action="append", choices=CANDIDATES, help="measure only these (repeatable)")
    p.add_argument("--quick", action="store_true", help="1 round of 1 s per load, no warm-up: checks that it works")
    p.add_argument("--json", metavar="FILE", help="append the result to FILE as one JSON line")
    # A candidate's own process (granian runs its own).
    p.add_argument("--serve", choices=[c for c in CANDIDATES if c != STARLETTE_GRANIAN], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 1, 0
    signal.signal(signal.SIGTERM, interrupt)
    return main_bench(args)


if __name__ == "__main__":
    sys.exit(main())
