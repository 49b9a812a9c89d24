#!/usr/bin/env python3
"""Which gRPC client fluxkv-bench should load a node with: the candidates against
one node, in rounds, the order rotated each round, each with the same closed-loop
Set load (-c in flight on one connection, -n requests):

- h2load (bench/h2load.py): the yardstick, a C client that costs the node's
  machine little. It counts HTTP 200 as a success and reads no grpc-status
  (every Set of its one key succeeds; the tool's runs check theirs);
- fluxkv-bench --engine grpcio: grpc.aio channels, the tool's client until the
  lean engine; and the same with --processes 2;
- fluxkv-bench on h2: the tool's own driver and checks with its connections
  replaced by h2's HTTP/2 state machine (python-hyper's, the library Python's
  HTTP/2 clients use), one H2Connection per channel, header validation off,
  no deadlines: what a client on the field's library costs;
- fluxkv-bench --engine lean (fluxkv/bench/h2_engine.py) on asyncio's event loop;
- the same on uvloop's, as the tool runs it; and with --processes 2.

It prints, per candidate, the median calls/s, its median ratio to h2load's in
the same round, and the client's and the server's CPU per call. Without --addr
it starts `cmd/fluxkv-server --port 0` itself. bench/README.md has the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
from google.protobuf.message import Message

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from h2load import INSTALL, h2load  # noqa: E402
from unary_set import NODE_ENV, Server  # noqa: E402

from fluxkv.bench import load as bench_load  # noqa: E402
from fluxkv.bench import main as bench  # noqa: E402
from fluxkv.bench.h2_engine import Failure  # noqa: E402
from fluxkv.bench.report import machine  # noqa: E402

TOOL = [sys.executable, str(ROOT / "cmd" / "fluxkv-bench")]
PATCHED = [sys.executable, str(Path(__file__).resolve()), "--patched"]
CANDIDATES: dict[str, list[str] | None] = {
    "h2load": None,
    "grpcio": [*TOOL, "--engine", "grpcio"],
    "grpcio, 2 processes": [*TOOL, "--engine", "grpcio", "--processes", "2"],
    "h2": [*PATCHED, "h2"],
    "lean, asyncio's loop": [*PATCHED, "asyncio"],
    "lean": [*TOOL, "--engine", "lean"],
    "lean, 2 processes": [*TOOL, "--engine", "lean", "--processes", "2"],
}
RUN_TIMEOUT_S = 600


# -- the h2 candidate ---------------------------------------------------------------


class _H2Protocol(asyncio.Protocol):
    """One connection on h2's state machine; the calls of one event-loop turn go out in one write."""

    def __init__(self) -> None:
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._transport: asyncio.Transport | None = None
        self._calls: dict[int, tuple[asyncio.Future[Failure | None], Callable[[bytes], Message], list[bytes]]] = {}
        self._status: dict[int, bytes] = {}
        self._flushing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is one, not of the class
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(2**31 - 1 - 65_535)
        self._flush()

    def call(self, headers: list[tuple[bytes, bytes]], body: bytes, parse: Callable[[bytes], Message]) -> Any:
        future: asyncio.Future[Failure | None] = asyncio.get_running_loop().create_future()
        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream, headers)
        self.conn.send_data(stream, b"\0" + len(body).to_bytes(4, "big") + body, end_stream=True)
        self._calls[stream] = (future, parse, [])
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)
        return future

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RemoteSettingsChanged) and not self.ready.done():
                self.ready.set_result(None)
            elif isinstance(event, h2.events.DataReceived) and event.stream_id:
                self._calls[event.stream_id][2].append(event.data or b"")
                self.conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived | h2.events.ResponseReceived) and event.stream_id:
                for name, value in event.headers or []:
                    if name == b"grpc-status":
                        self._status[event.stream_id] = bytes(value)
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id:
                future, parse, chunks = self._calls.pop(event.stream_id)
                status = self._status.pop(event.stream_id, b"")
                result = None if status == b"0" else Failure(status.decode() or "UNKNOWN", "")
                if result is None:
                    parse(b"".join(chunks)[5:])
                future.set_result(result)
            elif isinstance(event, h2.events.StreamReset) and event.stream_id:
                self._calls.pop(event.stream_id)[0].set_result(Failure("RST_STREAM", ""))
        self._flush()

    def _flush(self) -> None:
        self._flushing = False
        if self._transport is not None and (data := self.conn.data_to_send()):
            self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class H2Connections:
    """bench_load's Connections on h2: one _H2Protocol per channel, connected on the first call."""

    def __init__(self, nodes: Sequence[str], conns: int) -> None:
        self.nodes = list(nodes)
        self._channels: list[list[list[_H2Protocol]]] = [[[] for _ in range(conns)] for _ in nodes]

    def calls(self, rpc: bench_load.Rpc, timeout_s: float) -> list[list[bench_load.Call]]:
        def on(node: str, slot: list[_H2Protocol]) -> bench_load.Call:
            headers = [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", rpc.path.encode()),
                (b":authority", node.encode()),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ]

            async def connect_then(body: bytes) -> Failure | None:
                host, _, port = node.rpartition(":")
                _, protocol = await asyncio.get_running_loop().create_connection(_H2Protocol, host, int(port))
                await protocol.ready
                slot.append(protocol)
                result: Failure | None = await protocol.call(headers, body, rpc.response.FromString)
                return result

            def call(body: bytes) -> Awaitable[Failure | None]:
                if slot:
                    result: Awaitable[Failure | None] = slot[0].call(headers, body, rpc.response.FromString)
                    return result
                return connect_then(body)

            return call

        return [[on(node, slot) for slot in row] for node, row in zip(self.nodes, self._channels, strict=True)]

    async def close(self) -> None:
        for row in self._channels:
            for slot in row:
                for protocol in slot:
                    protocol.close()


def run_patched(candidate: str, argv: list[str]) -> int:
    """fluxkv-bench, one process, with H2Connections for its connections (h2), or
    with the lean engine on asyncio's event loop (asyncio)."""

    def on_h2(plan: bench_load.Plan, conns: int) -> bench_load.Connections:
        return H2Connections(plan.nodes, conns)

    if candidate == "h2":
        bench_load.connections = on_h2  # type: ignore[assignment]
        bench.connections = on_h2  # type: ignore[attr-defined]
    else:
        bench_load.LOOPS["lean"] = None
    return bench.run(argv)


# -- the rounds ---------------------------------------------------------------------


def yardstick(address: str, pid: int, args: argparse.Namespace) -> dict[str, float]:
    run = h2load(address, args.requests, 1, args.concurrency, 100, pid)
    if run.succeeded != run.calls:
        raise RuntimeError(f"h2load: {run.calls - run.succeeded} of {run.calls} calls failed")
    return {
        "calls_per_s": run.calls_per_s,
        "client_us": run.client_cpu_us_per_call,
        "server_us": run.server_cpu_us_per_call,
    }


def tool(argv: list[str], address: str, pid: int, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run.json"
        load = ["--addr", address, "-c", str(args.concurrency), "-n", str(args.requests), "--warmup", str(args.warmup)]
        done = subprocess.run(
            [*argv, *load, "--server-pid", str(pid), "--json", str(out)],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        if done.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr}")
        record = json.loads(out.read_text())
    if record["failures"]:
        raise RuntimeError(f"{' '.join(argv)}: failures {record['failures']}")
    return {
        "calls_per_s": record["throughput_per_s"],
        "client_us": record["client_cpu_us_per_request"],
        "server_us": record["server_cpu_us_per_request"],
    }


def report(names: list[str], rounds: list[dict[str, dict[str, float]]]) -> str:
    lines = [
        "| client | calls/s (median) | vs h2load (median of rounds) | client CPU µs/call | server CPU µs/call |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in names:
        runs = [r[name] for r in rounds]

        def median(field: str, of: list[dict[str, float]] = runs) -> float:
            return statistics.median(run[field] for run in of)

        ratios = [r[name]["calls_per_s"] / r["h2load"]["calls_per_s"] for r in rounds]
        spread = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        cpu = f"{median('client_us'):.1f} | {median('server_us'):.1f}"
        lines.append(f"| {name} | {median('calls_per_s'):.0f} | {spread} | {cpu} |")
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:2] == ["--patched"]:
        return run_patched(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description="fluxkv-bench's candidate gRPC clients against one node, with h2load.")
    p.add_argument("--addr", metavar="HOST:PORT", help="a running node (needs --server-pid); default: start one")
    p.add_argument("--server-pid", type=int, metavar="PID", help="the running node's pid")
    p.add_argument("-c", "--concurrency", type=int, default=100, help="calls in flight, on one connection (100)")
    p.add_argument("-n", "--requests", type=int, default=50_000, help="measured calls per candidate and round")
    p.add_argument("--warmup", type=int, default=1000, help="fluxkv-bench's unmeasured calls first (1000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, the candidates' order rotated each (3)")
    p.add_argument(
        "--only",
        action="append",
        choices=[name for name in CANDIDATES if name != "h2load"],
        metavar="NAME",
        help="measure this candidate (repeatable; h2load always runs); default: all",
    )
    p.add_argument("--json", metavar="FILE", help="append one JSON line with the machine and every run")
    args = p.parse_args()
    if (args.addr is None) != (args.server_pid is None):
        p.error("--addr and --server-pid go together")
    if shutil.which("h2load") is None:
        p.error(f"needs h2load: {INSTALL}")
    server = None
    names = ["h2load", *(args.only or [name for name in CANDIDATES if name != "h2load"])]
    rounds: list[dict[str, dict[str, float]]] = []
    try:
        if args.addr is None:
            server = Server("fluxkv", [sys.executable, str(ROOT / "cmd" / "fluxkv-server"), "--port", "0"], NODE_ENV)
            server.wait_ready()
            args.addr, args.server_pid = server.address, server.proc.pid
        for i in range(args.rounds):
            order = names[i % len(names) :] + names[: i % len(names)]
            runs: dict[str, dict[str, float]] = {}
            for name in order:
                argv = CANDIDATES[name]
                if argv is None:
                    runs[name] = yardstick(args.addr, args.server_pid, args)
                else:
                    runs[name] = tool(argv, args.addr, args.server_pid, args)
                print(f"round {i + 1}, {name}: {runs[name]}", file=sys.stderr, flush=True)
            rounds.append(runs)
    finally:
        if server is not None:
            server.stop()
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, Python {info['python']}, load average {info['loadavg']}")
    print(f"-c {args.concurrency} on one connection, {args.requests} Sets per run, {args.rounds} rounds\n")
    print(report(names, rounds))
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps({"machine": info, "settings": vars(args), "rounds": rounds}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
