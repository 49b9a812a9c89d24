"""h2load (Debian's nghttp2-client), a C HTTP/2 load generator, as a gRPC client:
unary calls with one gRPC-framed request as every request's body (by default
/fluxkv.v1.KV/Set with a SetRequest; a Call names another method and request).
It costs the machine far less per call than any Python client, so what it
measures is the server.

h2load knows HTTP, not gRPC: a call answered HTTP 200 with a gRPC error status in
its trailers counts as a success to it. Whoever uses these figures checks the
calls some other way (bench/transport.py compares a node's revision with the calls
sent: every Set of the same key takes the next revision).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from fluxkv.bench.load import key_name
from fluxkv.bench.server_probe import cpu_seconds
from fluxkv.proto import kv_pb2, kv_pb2_grpc

METHOD = "/fluxkv.v1.KV/Set"
KEY = "h2load"
INSTALL = "apt-get install nghttp2-client"
TIMEOUT_S = 600.0
_REQUESTS = re.compile(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored")


class H2loadMissing(RuntimeError):
    """h2load is not on PATH."""


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: not compressed, 4-byte big-endian length, the bytes."""
    return struct.pack(">BI", 0, len(message)) + message


def set_body(value_size: int) -> bytes:
    return grpc_frame(kv_pb2.SetRequest(key=KEY, value=b"x" * value_size).SerializeToString())


@dataclass(frozen=True)
class Call:
    """What every call of an h2load run sends: a method of fluxkv.v1.KV, its request, and
    how many items (keys) the request carries."""

    method: str  # "Set", "MultiGet", ...
    request: Message
    items: int = 1

    @property
    def path(self) -> str:
        return f"/fluxkv.v1.KV/{self.method}"


def batch_keys(items: int) -> list[str]:
    """The keys of a batch call: fluxkv-bench's names, key:000000000000..."""
    return [key_name(i) for i in range(items)]


def unary_call(method: str, value_size: int) -> Call:
    """Set of KEY with a value of `value_size` bytes, or Get of KEY."""
    if method == "Set":
        return Call(method, kv_pb2.SetRequest(key=KEY, value=b"x" * value_size))
    if method == "Get":
        return Call(method, kv_pb2.GetRequest(key=KEY))
    raise ValueError(f"not a unary method h2load sends: {method}")


def batch_call(method: str, items: int, value_size: int) -> Call:
    """MultiSet or MultiGet of batch_keys(items) (MultiSet: values of `value_size` bytes)."""
    keys = batch_keys(items)
    if method == "MultiSet":
        sets = [kv_pb2.SetRequest(key=key, value=b"x" * value_size) for key in keys]
        return Call(method, kv_pb2.MultiSetRequest(items=sets), items)
    if method == "MultiGet":
        return Call(method, kv_pb2.MultiGetRequest(keys=keys), items)
    raise ValueError(f"not a batch method h2load sends: {method}")


@dataclass
class H2loadRun:
    calls: int
    succeeded: int  # by HTTP status: see the module's docstring
    seconds: float
    calls_per_s: float
    mean_ms: float
    p50_ms: float
    p99_ms: float
    server_cpu_us_per_call: float
    client_cpu_us_per_call: float


def h2load(
    addresses: Sequence[str],
    calls: int,
    connections: int,
    streams: int,
    value_size: int,
    server_pid: int,
    tls: bool = False,
    headers: Sequence[str] = (),
    call: Call | None = None,
) -> H2loadRun:
    """`calls` unary Sets (or `call`s) to each of `addresses` at once (one h2load process each, say one per
    worker), over `connections` connections with up to `streams` calls in flight on each; server
    CPU per call from /proc of `server_pid` and its descendants (the workers). With `tls`, over
    TLS (h2load does not verify the server's certificate). `headers`: more request headers
    ("name: value"), such as a token's authorization."""
    tool = shutil.which("h2load")
    if tool is None:
        raise H2loadMissing(f"h2load is not on PATH (Debian: {INSTALL})")
    with tempfile.TemporaryDirectory(prefix="fluxkv-h2load-") as tmp:
        body = Path(tmp) / "body"
        body.write_bytes(set_body(value_size) if call is None else grpc_frame(call.request.SerializeToString()))
        path = METHOD if call is None else call.path
        logs = [Path(tmp) / f"log-{i}.tsv" for i in range(len(addresses))]
        server_before, client_before = cpu_seconds(server_pid), children_cpu_s()
        started = time.perf_counter()
        options = ["-n", str(calls), "-c", str(connections), "-m", str(streams), "-t", "1", "-d", str(body),
                   "-H", "content-type: application/grpc", "-H", "te: trailers"]  # fmt: skip
        for header in headers:
            options += ["-H", header]
        scheme = "https" if tls else "http"
        procs = [
            subprocess.Popen(
                [tool, *options, f"--log-file={log}", f"{scheme}://{address}{path}"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for address, log in zip(addresses, logs, strict=True)
        ]
        outputs = [proc.communicate(timeout=TIMEOUT_S) for proc in procs]
        seconds = time.perf_counter() - started
        server_cpu, client_cpu = cpu_seconds(server_pid) - server_before, children_cpu_s() - client_before
        succeeded = 0
        for proc, (out, err) in zip(procs, outputs, strict=True):
            counts = _REQUESTS.search(out)
            if proc.returncode != 0 or counts is None:
                raise RuntimeError(f"h2load failed (exit {proc.returncode}): {(err or out).strip()}")
            succeeded += int(counts.group(3))
        latencies_ms = sorted(int(line.split("\t")[2]) / 1000 for log in logs for line in log.read_text().splitlines())
    total = calls * len(addresses)
    return H2loadRun(
        calls=total,
        succeeded=succeeded,
        seconds=seconds,
        calls_per_s=total / seconds,
        mean_ms=statistics.fmean(latencies_ms),
        p50_ms=latencies_ms[len(latencies_ms) // 2],
        p99_ms=latencies_ms[min(len(latencies_ms) - 1, int(len(latencies_ms) * 0.99))],
        server_cpu_us_per_call=server_cpu / total * 1e6,
        client_cpu_us_per_call=client_cpu / total * 1e6,
    )


def revision(address: str) -> int:
    """A node's revision (Info): what checks h2load's Sets, which it counts by HTTP status."""
    with grpc.insecure_channel(address) as channel:
        return int(kv_pb2_grpc.KVStub(channel).Info(kv_pb2.InfoRequest(), timeout=10).revision)


def children_cpu_s() -> float:
    """CPU time of this process's waited-for children: the load generator, once it has exited."""
    times = os.times()
    return times.children_user + times.children_system


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """h2load's load shape, as the benchmarks that drive it take it."""
    p.add_argument("--connections", type=int, default=4, help="h2load connections (default 4)")
    p.add_argument("--streams", type=int, default=25, help="calls in flight per connection (default 25)")


def append_record(
    path: str, bench: str, info: dict[str, object], args: argparse.Namespace, runs: Mapping[str, Sequence[Any]],
    checks: dict[str, str], **extra: object,
) -> None:  # fmt: skip
    """Append one JSON line: the benchmark, the machine, its arguments, every run (dataclasses), every check, and
    any `extra` fields (a summary)."""
    record = {"bench": bench, "time": time.time(), "machine": info, "args": vars(args),
              "runs": {name: [asdict(r) for r in rs] for name, rs in runs.items()}, "checks": checks,
              **extra}  # fmt: skip
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
