"""fluxkv-bench's output: live progress on stderr, the summary on stdout (after
redis-benchmark's), and the JSON result (schema in bench/README.md)."""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import grpc
import hpack
from google.protobuf import __version__ as protobuf_version

from fluxkv.bench.histogram import Histogram
from fluxkv.version import __version__

SCHEMA = 1
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p99_9": 99.9}
TTY_REFRESH_S = 0.25
PLAIN_EVERY_S = 5.0
SATURATED = 0.9  # a client process busy this share of a core or more is the bottleneck


@dataclass
class Result:
    """The measured phase, merged over the client processes."""

    started: str  # ISO 8601, UTC
    hist: Histogram  # latencies of the successful requests, in ns
    failures: dict[str, int]  # status code name -> count
    duration_s: float
    items_per_call: int
    client_cpu_s: float
    client_busiest: float | None  # CPU seconds per second of the busiest client process (1.0: a core)
    server_cpu_s: float | None
    interrupted: bool

    @property
    def successes(self) -> int:
        return self.hist.total

    @property
    def requests(self) -> int:
        return self.hist.total + sum(self.failures.values())

    def per_s(self, count: int) -> float:
        return count / self.duration_s if self.duration_s > 0 else 0.0

    def latency_ms(self) -> dict[str, float | None]:
        h = self.hist
        values = {"min": h.min, "avg": h.mean(), **{k: h.percentile(p) for k, p in PERCENTILES.items()}, "max": h.max}
        return {k: round(v / 1e6, 4) if h.total else None for k, v in values.items()}

    def cpu_us_per_request(self, seconds: float | None) -> float | None:
        return None if seconds is None or not self.requests else round(seconds * 1e6 / self.requests, 2)

    def client_bound(self) -> list[str]:
        """Why the client, not the server, may have set the pace: its CPU per
        request over the server's, or a client process busy a whole core."""
        reasons = []
        client, server = self.cpu_us_per_request(self.client_cpu_s), self.cpu_us_per_request(self.server_cpu_s)
        if client is not None and server is not None and client > server:
            reasons.append(f"the client's CPU per request ({client:.1f} µs) is above the server's ({server:.1f} µs)")
        if self.client_busiest is not None and self.client_busiest >= SATURATED:
            reasons.append(f"a client process was busy {self.client_busiest:.0%} of a core")
        return reasons


def machine() -> dict[str, Any]:
    """The machine and software the run was measured on."""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "unknown")
    except OSError:
        cpu = platform.processor() or "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "hpack": hpack.__version__,
        "protobuf": protobuf_version,
        "fluxkv": __version__,
        "commit": _commit(),
    }


def _commit() -> str | None:
    """The git commit of the checkout fluxkv runs from (+dirty with uncommitted changes); None when installed."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None

    def git(*argv: str) -> str:
        r = subprocess.run(["git", "-C", str(root), *argv], capture_output=True, text=True, check=False)
        return r.stdout.strip() if r.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if commit and git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    return commit or None


def to_json(result: Result, settings: dict[str, Any], nodes: list[str], machine_info: dict[str, Any]) -> dict[str, Any]:
    return {
        "tool": "fluxkv-bench",
        "schema": SCHEMA,
        "time": result.started,
        "machine": machine_info,
        "settings": settings,
        "nodes": nodes,
        "requests": result.requests,
        "duration_s": round(result.duration_s, 6),
        "successes": result.successes,
        "failures": dict(sorted(result.failures.items())),
        "throughput_per_s": round(result.per_s(result.successes), 2),
        "items_per_s": round(result.per_s(result.successes * result.items_per_call), 2),
        "latency_ms": result.latency_ms(),
        "client_cpu_us_per_request": result.cpu_us_per_request(result.client_cpu_s),
        "client_cpu_busiest_process": None if result.client_busiest is None else round(result.client_busiest, 3),
        "server_cpu_us_per_request": result.cpu_us_per_request(result.server_cpu_s),
        "client_bound": result.client_bound(),
        "interrupted": result.interrupted,
    }


def summary(record: dict[str, Any]) -> str:
    """The human-readable report of a JSON record."""
    s, m = record["settings"], record["machine"]
    mode = f"open loop at {s['rate']:g} requests/s" if s["rate"] else "closed loop"
    batch = f", {s['batch']} items per call" if s["batch"] else ""
    ratio = f", {s['read_ratio']:g} reads" if s["read_ratio"] is not None else ""
    lines = [
        f"====== {s['workload'].upper()} on {s['target']} ======",
        f"  {s['concurrency']} in flight ({mode}), {s['conns']} channel(s) per node and process, "
        f"{s['processes']} client process(es), {s['engine']} engine",
        f"  {s['keyspace']} keys, {s['value_size']}-byte values{batch}{ratio}",
        f"  nodes: {', '.join(record['nodes'])}",
        f"  client: {m['cpu']}, {m['cores']} cores, load average {m['loadavg'][0]:g}; Python {m['python']}, "
        f"grpcio {m['grpcio']}, fluxkv {m['fluxkv']}" + (f" ({m['commit']})" if m["commit"] else ""),
        f"  {record['requests']} requests completed in {record['duration_s']:.2f} s"
        + ("  (INTERRUPTED: partial results)" if record["interrupted"] else ""),
        "",
        f"  successes:  {record['successes']}",
        "  failures:   " + (", ".join(f"{code} {n}" for code, n in record["failures"].items()) or "none"),
        f"  throughput: {record['throughput_per_s']:.1f} requests/s (successful requests only)",
    ]
    if s["batch"]:
        lines.append(f"              {record['items_per_s']:.1f} items/s")
    latency = record["latency_ms"]
    lines += [
        "",
        "  latency (ms, successful requests):",
        "  " + "".join(f"{name.replace('_', '.'):>10}" for name in latency),
        "  " + "".join(f"{v:>10.3f}" if v is not None else f"{'-':>10}" for v in latency.values()),
        "",
        f"  client CPU: {_us(record['client_cpu_us_per_request'])} per request"
        + (f" (busiest process: {busiest:.0%} of a core)" if (busiest := record["client_cpu_busiest_process"]) else ""),
        f"  server CPU: {_us(record['server_cpu_us_per_request'])} per request"
        + (f" (pid {s['server_pid']} and its children)" if s["server_pid"] else " (give --server-pid)"),
    ]
    if record["client_bound"]:
        lines += ["", "  WARNING: the client may be the bottleneck, not the server:"]
        lines += [f"    {reason}" for reason in record["client_bound"]]
        lines.append("    (use --processes, or run the client on another host)")
    return "\n".join(lines)


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} µs"


class Progress:
    """The measured phase as it goes, on stderr: a one-line bar redrawn 4 times a
    second on a terminal; otherwise a plain line every 5 s or 10% of the requests."""

    def __init__(self, requests: int | None, duration_s: float | None, stream: TextIO = sys.stderr) -> None:
        self._requests, self._duration = requests, duration_s
        self._stream = stream
        self._tty = stream.isatty()
        self.interval_s = TTY_REFRESH_S if self._tty else TTY_REFRESH_S * 2
        self._start = self._last_line = 0.0
        self._window: deque[tuple[float, int]] = deque()
        self._last_step = 0

    def begin(self) -> None:
        """The measured phase starts now."""
        self._start = self._last_line = time.monotonic()
        self._window.append((self._start, 0))
        amount = f"{self._requests} requests" if self._requests else f"for {self._duration:g} s"
        print(f"fluxkv-bench: measuring {amount}", file=self._stream, flush=True)

    def update(self, done: int, failed: int) -> None:
        now = time.monotonic()
        self._window.append((now, done))
        while len(self._window) > 2 and now - self._window[1][0] >= 1.0:  # about the last second
            self._window.popleft()
        t0, done0 = self._window[0]
        qps = (done - done0) / (now - t0) if now > t0 else 0.0
        elapsed = now - self._start
        if self._requests:
            fraction = done / self._requests
            where = f"{done}/{self._requests}"
        else:
            fraction = elapsed / self._duration if self._duration else 0.0
            where = f"{elapsed:.0f}/{self._duration:g} s, {done} done"
        text = f"{where}  {qps:.0f} req/s  errors {failed}"
        if self._tty:
            filled = math.floor(min(fraction, 1.0) * 30)
            self._stream.write(f"\r[{'#' * filled}{' ' * (30 - filled)}] {fraction:4.0%} {text}\x1b[K")
            self._stream.flush()
            return
        step = math.floor(fraction * 10)
        if step > self._last_step or now - self._last_line >= PLAIN_EVERY_S:
            self._last_step, self._last_line = max(step, self._last_step), now
            print(f"fluxkv-bench: {fraction:.0%} {text}", file=self._stream, flush=True)

    def finish(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()
