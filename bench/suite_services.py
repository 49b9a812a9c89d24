"""The outside services bench/suite.py measures against: a private etcd, the local RabbitMQ
broker (for the CDC node) and the local Redis through redis-benchmark. A missing one raises
Unavailable with the reason, and the suite reports its scenarios as skipped."""

from __future__ import annotations

import asyncio
import csv
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aio_pika
from h2load import H2loadMissing, h2load

HOST = "127.0.0.1"
ETCD_START_TIMEOUT_S = 30.0
BROKER_TIMEOUT_S = 5.0
REDIS_PORT = 6379
REDIS_TIMEOUT_S = 300.0
REDIS_PING_TIMEOUT_S = 2.0
# /health is on loopback: a proxy from the environment must not be asked for it.
_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Unavailable(RuntimeError):
    """A reference service or tool is not there; the message says why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class Etcd:
    """A single-member etcd on free loopback ports with its data in a temporary directory, deleted at stop()."""

    def __init__(self) -> None:
        etcd = shutil.which("etcd")
        if etcd is None:
            raise Unavailable("etcd not found on PATH (Debian: apt-get install etcd-server)")
        self._dir = Path(tempfile.mkdtemp(prefix="fluxkv-suite-etcd-"))
        client_port = free_port()
        peer_port = free_port()
        while peer_port == client_port:
            peer_port = free_port()
        self.endpoint = f"{HOST}:{client_port}"
        peer = f"http://{HOST}:{peer_port}"
        self._log = self._dir / "etcd.log"
        with self._log.open("wb") as log:
            self.proc = subprocess.Popen(
                [etcd, "--name=suite", f"--data-dir={self._dir / 'data'}",
                 f"--listen-client-urls=http://{self.endpoint}", f"--advertise-client-urls=http://{self.endpoint}",
                 f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
                 f"--initial-cluster=suite={peer}", f"--initial-cluster-token=suite-{client_port}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + ETCD_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise Unavailable(f"etcd exited with {self.proc.returncode} while starting: {self._tail()}")
            try:
                with _no_proxy.open(f"http://{self.endpoint}/health", timeout=1) as answer:
                    if json.load(answer).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass  # not listening or not healthy yet
            time.sleep(0.05)
        raise Unavailable(f"etcd was not healthy within {ETCD_START_TIMEOUT_S:.0f} s: {self._tail()}")

    def _tail(self) -> str:
        return " / ".join(self._log.read_text(errors="replace").splitlines()[-3:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


def check_broker(url: str) -> None:
    """Raise Unavailable unless the AMQP broker at url accepts a connection."""

    async def connect() -> None:
        connection = await aio_pika.connect(url, timeout=BROKER_TIMEOUT_S)
        await connection.close()

    try:
        asyncio.run(asyncio.wait_for(connect(), BROKER_TIMEOUT_S))
    except Exception as exc:
        where = url.split("@")[-1]
        raise Unavailable(f"RabbitMQ at {where} not reachable: {type(exc).__name__}: {exc}") from exc


# The one key redis-benchmark's SET writes (without -r); deleted after the run.
REDIS_BENCH_KEY = "key:__rand_int__"


def _redis(command: str, expect: bytes) -> None:
    """Send one inline command; raise Unavailable unless the answer starts with `expect`.
    PING first: redis-benchmark would wait forever for a Redis that is not there."""
    try:
        with socket.create_connection((HOST, REDIS_PORT), timeout=REDIS_PING_TIMEOUT_S) as sock:
            sock.sendall(command.encode() + b"\r\n")
            answer = sock.recv(256)
    except OSError as exc:
        raise Unavailable(f"Redis at {HOST}:{REDIS_PORT} not reachable: {exc}") from exc
    if not answer.startswith(expect):
        raise Unavailable(f"Redis at {HOST}:{REDIS_PORT} answered {command} with {answer.decode(errors='replace')!r}")


def redis_set(concurrency: int, requests: int, value_size: int) -> dict[str, Any]:
    """Run redis-benchmark's SET against the local Redis; its figures in fluxkv-bench's JSON shape."""
    tool = shutil.which("redis-benchmark")
    if tool is None:
        raise Unavailable("redis-benchmark not found on PATH (Debian: apt-get install redis-tools)")
    _redis("PING", b"+PONG")
    argv = [tool, "-h", HOST, "-p", str(REDIS_PORT), "-t", "set", "-c", str(concurrency), "-n", str(requests),
            "-d", str(value_size), "--csv", "-q"]  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=REDIS_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"redis-benchmark did not finish within {REDIS_TIMEOUT_S:.0f} s") from None
    finally:
        _redis(f"DEL {REDIS_BENCH_KEY}", b":")
    rows = [row for row in csv.DictReader(done.stdout.splitlines()) if row.get("test") == "SET"]
    if done.returncode != 0 or not rows:
        output = (done.stderr + done.stdout).strip().splitlines()
        raise Unavailable(f"redis-benchmark failed (exit {done.returncode}): {' / '.join(output[-3:])}")
    row = rows[0]
    rps = float(row["rps"])
    return {
        "requests": requests,
        "duration_s": requests / rps,
        "throughput_per_s": rps,
        "items_per_s": rps,
        "latency_ms": {
            key: float(row[f"{key}_latency_ms"]) for key in ("min", "avg", "p50", "p95", "p99", "max")
        },  # redis-benchmark gives no p90 or p99.9
        "failures": None,  # not reported by redis-benchmark
        "server_cpu_us_per_request": None,
        "client_cpu_us_per_request": None,
        "argv": argv,
    }


def h2load_set(server_pid: int, address: str, concurrency: int, requests: int, value_size: int) -> dict[str, Any]:
    """h2load's unary Sets against a node (bench/h2load.py), `concurrency` in flight over two connections;
    its figures in fluxkv-bench's JSON shape."""
    connections = 2
    try:
        run = h2load([address], requests, connections, max(1, concurrency // connections), value_size, server_pid)
    except H2loadMissing as exc:
        raise Unavailable(str(exc)) from None
    return {
        "requests": requests,
        "duration_s": run.seconds,
        "throughput_per_s": run.calls_per_s,
        "items_per_s": run.calls_per_s,
        "latency_ms": {"avg": run.mean_ms, "p50": run.p50_ms, "p99": run.p99_ms},
        "failures": None,  # h2load counts HTTP statuses, not gRPC ones (bench/transport.py checks the revision)
        "server_cpu_us_per_request": run.server_cpu_us_per_call,
        "client_cpu_us_per_request": run.client_cpu_us_per_call,
    }
