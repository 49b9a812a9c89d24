#!/usr/bin/env python3
"""What TLS costs a node: h2load (bench/h2load.py) sends the same unary Set to a
node on pygrpc-native in plaintext (the default), a node on grpcio in plaintext,
and a node on grpcio over TLS (a TLS node serves on grpcio: pygrpc-native has no
TLS), rounds interleaved in one run. It prints calls/s, server CPU per call and
latency, the ratios, and each node's revision checked against the calls sent.
The certificates are made for the run (trustme, of the dev extra).

    .venv/bin/python bench/security.py [--calls 100000] [--rounds 3] [--json FILE]

See bench/README.md ("Security").
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import pygrpc_native
import trustme

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from h2load import H2loadRun, add_load_arguments, append_record, h2load  # noqa: E402
from transport import median_run  # noqa: E402
from unary_set import Server, interrupt, row  # noqa: E402

from fluxkv.bench.report import machine  # noqa: E402
from fluxkv.proto import kv_pb2, kv_pb2_grpc  # noqa: E402
from fluxkv.security.tls import TLS, aio_channel  # noqa: E402

NODE = [sys.executable, str(ROOT / "cmd" / "fluxkv-server"), "--port", "0"]
PLAIN_NATIVE, PLAIN_GRPCIO, TLS_GRPCIO = "native", "grpcio", "grpcio+tls"


def certificates(directory: Path) -> dict[str, str]:
    """A CA and a certificate it signed for 127.0.0.1: the TLS node's environment, and the CA's path."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(directory / "ca.pem")
    leaf.private_key_pem.write_to_path(directory / "key.pem")
    (directory / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    return {
        "FLUX_TLS_CERT_FILE": str(directory / "cert.pem"),
        "FLUX_TLS_KEY_FILE": str(directory / "key.pem"),
        "ca": str(directory / "ca.pem"),
    }


async def revision(address: str, tls: TLS | None) -> int:
    async with aio_channel(address, None if tls is None else tls.channel_credentials()) as channel:
        info = await kv_pb2_grpc.KVStub(channel).Info(kv_pb2.InfoRequest(), timeout=10)
    return int(info.revision)


def ratio(runs: dict[str, list[H2loadRun]], a: str, b: str) -> str:
    ratios = [x.calls_per_s / y.calls_per_s for x, y in zip(runs[a], runs[b], strict=True)]
    extra = median_run(runs[a]).server_cpu_us_per_call - median_run(runs[b]).server_cpu_us_per_call
    return (
        f"{a} / {b}: {statistics.median(ratios):.2f}x the calls/s (rounds {min(ratios):.2f}-{max(ratios):.2f}), "
        f"{extra:+.0f} µs of server CPU per call"
    )


async def main_async(args: argparse.Namespace) -> int:
    info = machine()
    info["pygrpc_native"] = pygrpc_native.__version__
    with tempfile.TemporaryDirectory(prefix="fluxkv-bench-tls-") as tmp:
        files = certificates(Path(tmp))
        ca = TLS(files.pop("ca"))
        admin_off = {"FLUX_ADMIN_PORT": "off"}
        started = [
            Server(PLAIN_NATIVE, [*NODE, "--grpc-server", "native"], admin_off),
            Server(PLAIN_GRPCIO, [*NODE, "--grpc-server", "grpcio"], admin_off),
            Server(TLS_GRPCIO, [*NODE, "--grpc-server", "grpcio"], {**admin_off, **files}),
        ]
        tls_of = {PLAIN_NATIVE: None, PLAIN_GRPCIO: None, TLS_GRPCIO: ca}
        try:
            for server in started:
                server.wait_ready()
            sent = {s.name: 0 for s in started}
            runs: dict[str, list[H2loadRun]] = {s.name: [] for s in started}
            load = (args.connections, args.streams, args.value_size)

            def measure(server: Server, calls: int) -> H2loadRun:
                run = h2load(server.addresses, calls, *load, server.proc.pid, tls=tls_of[server.name] is not None)
                server.check_alive()
                sent[server.name] += run.calls
                return run

            for server in started:  # warm-up, not measured
                measure(server, args.calls // 10)
            for rnd in range(1, args.rounds + 1):
                for server in started:
                    run = measure(server, args.calls)
                    runs[server.name].append(run)
                    print(f"round {rnd}  {server.name:<12} {run.calls_per_s:>9,.0f} calls/s  "
                          f"{run.server_cpu_us_per_call:6.0f} µs server CPU per call", flush=True)  # fmt: skip
            checks, failed = {}, False
            for server in started:
                got = await revision(server.address, tls_of[server.name])
                ok = got == sent[server.name]
                failed |= not ok
                checks[server.name] = f"revision {got}, {sent[server.name]} calls sent: " + (
                    "every call applied" if ok else "calls FAILED"
                )
        finally:
            for server in started:
                server.stop()
    print(
        f"machine: {info['cpu']} ({info['cores']} cores, load {info['loadavg']}), Python {info['python']}, "
        f"grpcio {info['grpcio']}, pygrpc-native {info['pygrpc_native']}"
    )
    print(f"load: h2load, {args.calls} unary Sets of {args.value_size} B per round, {args.connections} connections x "
          f"{args.streams} streams, {args.rounds} rounds interleaved; connections stay open, so a handshake is "
          "paid once per connection")  # fmt: skip
    widths = (-12, 10, 10, 10, 9, 9, 9)
    print(row(widths, "node", "calls/s", "server µs", "client µs", "mean ms", "p50 ms", "p99 ms"))
    for name, rs in runs.items():
        m = median_run(rs)
        cpu = (f"{m.server_cpu_us_per_call:.0f}", f"{m.client_cpu_us_per_call:.1f}")
        print(
            row(widths, name, f"{m.calls_per_s:,.0f}", *cpu, f"{m.mean_ms:.2f}", f"{m.p50_ms:.2f}", f"{m.p99_ms:.2f}")
        )
    print("(median round by calls/s; server and client µs: CPU per call, the client being h2load)")
    print(ratio(runs, TLS_GRPCIO, PLAIN_GRPCIO) + "  <- what TLS costs on the same server")
    print(ratio(runs, TLS_GRPCIO, PLAIN_NATIVE) + "  <- what switching TLS on costs a default node")
    for name, check in checks.items():
        print(f"{name}: {check}")
    if args.json:
        append_record(args.json, "security", info, args, runs, checks)
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--calls", type=int, default=100_000, help="calls per node and round (default 100000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each measuring every node once (default 3)")
    add_load_arguments(p)
    p.add_argument("--value-size", type=int, default=100, help="bytes per value (default 100)")
    p.add_argument("--json", metavar="FILE", help="append the result to FILE as one JSON line")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, interrupt)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
