#!/usr/bin/env python3
"""The benchmark suite: one command that starts a FluxKV node, a second one with CDC on, the
no-op pygrpc-native reference and a private etcd on loopback, drives each scenario with
cmd/fluxkv-bench (and the local Redis with redis-benchmark), and writes a markdown report,
PNG plots and a JSON record into a history folder, compared with the previous run of the
same mode. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import suite_report
from suite_services import Etcd, Unavailable, check_broker, h2load_set, redis_set
from unary_set import Server, delete_cdc_objects, interrupt, machine

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "cmd" / "fluxkv-bench"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
CONCURRENCY = 50
KEYSPACE = 10_000
MSET_ITEMS_PER_SET = 10  # a MultiSet scenario writes 10x the items a unary one does, in batches of -P
REDIS_FACTOR = 10  # Redis runs ~20x faster: the same request count would last a few milliseconds
TOOL_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Mode:
    """How much each scenario measures: quick checks the suite works, full is for numbers."""

    name: str
    requests: int
    warmup: int
    rounds: int


MODES = {"quick": Mode("quick", 2_000, 200, 1), "full": Mode("full", 20_000, 1_000, 3)}


@dataclass(frozen=True)
class Scenario:
    """One load against one server; `target` names the server."""

    name: str
    title: str
    group: str  # "fluxkv", "cdc" or "reference"
    target: str  # "fluxkv", "fluxkv+cdc", "noop", "etcd" or "redis"
    kind: str = "set"  # fluxkv-bench's workload, or "h2load" (its unary Set)
    value_size: int = 100
    items: int = 1
    read_ratio: float | None = None

    def requests(self, mode: Mode) -> int:
        if self.target == "redis":
            return mode.requests * REDIS_FACTOR
        if self.items > 1:
            return max(2 * CONCURRENCY, mode.requests * MSET_ITEMS_PER_SET // self.items)
        return mode.requests

    def args(self, mode: Mode) -> list[str]:
        """The load's arguments (without address, pid and output): runs compare only when these are equal."""
        args = ["-t", self.kind, "-c", str(CONCURRENCY), "-n", str(self.requests(mode)), "-d", str(self.value_size)]
        if self.target == "redis" or self.kind == "h2load":
            return args
        args += ["-r", str(KEYSPACE), "--warmup", str(mode.warmup)]
        if self.items > 1:
            args += ["-P", str(self.items)]
        if self.read_ratio is not None:
            args += ["--read-ratio", str(self.read_ratio)]
        if self.target == "etcd":
            args += ["--target", "etcd"]
        return args


# In the order each round runs them: the CDC node and the references run right after FluxKV's 100-byte Set, the load
# they are compared with, so that the same patch of the machine's weather hits them all.
SCENARIOS = [
    Scenario("set-10KB", "unary Set, 10 KB values", "fluxkv", "fluxkv", value_size=10_240),
    Scenario("set-1KB", "unary Set, 1 KB values", "fluxkv", "fluxkv", value_size=1_024),
    Scenario("noop-set-100B", "no-op pygrpc-native server, Set (the ceiling)", "reference", "noop"),
    Scenario(suite_report.BASELINE, "unary Set, 100 B values", "fluxkv", "fluxkv"),
    Scenario("set-100B-cdc", "unary Set, 100 B, CDC on (RabbitMQ)", "cdc", "fluxkv+cdc"),
    Scenario("h2load-set-100B", "h2load's unary Set (C): the node's capacity", "reference", "fluxkv", kind="h2load"),
    Scenario("etcd-put-100B", "etcd KV.Put through gRPC", "reference", "etcd"),
    Scenario("redis-set-100B", "Redis SET (redis-benchmark)", "reference", "redis"),
    Scenario("get-100B", "unary Get", "fluxkv", "fluxkv", kind="get"),
    Scenario("mixed-50-50", "50% Get, 50% Set", "fluxkv", "fluxkv", kind="mixed", read_ratio=0.5),
    Scenario("mset-10", "MultiSet, 10 items of 100 B", "fluxkv", "fluxkv", kind="mset", items=10),
    Scenario("mset-100", "MultiSet, 100 items of 100 B", "fluxkv", "fluxkv", kind="mset", items=100),
    Scenario("mset-1000", "MultiSet, 1000 items of 100 B", "fluxkv", "fluxkv", kind="mset", items=1000),
]


class ScenarioFailed(RuntimeError):
    """fluxkv-bench did not complete a run."""


def run_tool(scenario: Scenario, mode: Mode, server: Server | Etcd) -> dict[str, Any]:
    """One fluxkv-bench run; its JSON result."""
    address = server.address if isinstance(server, Server) else server.endpoint
    with tempfile.TemporaryDirectory(prefix="fluxkv-suite-") as tmp:
        out = Path(tmp) / "result.json"
        argv = [sys.executable, str(TOOL), "--addr", address, *scenario.args(mode), "--server-pid",
                str(server.proc.pid), "--json", str(out)]  # fmt: skip
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            raise ScenarioFailed(f"fluxkv-bench did not finish within {TOOL_TIMEOUT_S:.0f} s") from None
        if done.returncode != 0 or not out.exists():
            tail = " / ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise ScenarioFailed(f"fluxkv-bench exited with {done.returncode}: {tail}")
        result: dict[str, Any] = json.loads(out.read_text())
    if result.get("interrupted"):
        raise ScenarioFailed("fluxkv-bench reports the run as interrupted")
    return result


def summarize(scenario: Scenario, mode: Mode, rounds: list[dict[str, Any]], error: Exception | None) -> dict[str, Any]:
    """The scenario's result (see suite_report): its median round by throughput, every round kept."""
    result: dict[str, Any] = {
        "name": scenario.name,
        "title": scenario.title,
        "group": scenario.group,
        "target": scenario.target,
        "args": scenario.args(mode),
        "status": "ok",
        "reason": None,
        "rounds": rounds,
    }
    if error is not None:
        result.update(status="skipped" if isinstance(error, Unavailable) else "failed", reason=str(error))
        return result
    median = sorted(rounds, key=lambda r: r["throughput_per_s"])[(len(rounds) - 1) // 2]
    keys = ("throughput_per_s", "items_per_s", "latency_ms", "server_cpu_us_per_request",
            "client_cpu_us_per_request", "failures")  # fmt: skip
    result.update({key: median[key] for key in keys})
    return result


def run_matrix(mode: Mode, servers: dict[str, Server | Etcd | Unavailable]) -> list[dict[str, Any]]:
    """Every scenario, round after round; a scenario that fails or is unavailable is not tried again."""
    rounds: dict[str, list[dict[str, Any]]] = {s.name: [] for s in SCENARIOS}
    errors: dict[str, Exception] = {}
    for number in range(1, mode.rounds + 1):
        for s in SCENARIOS:
            if s.name in errors:
                continue
            server = servers.get(s.target)
            try:
                if isinstance(server, Unavailable):
                    raise server
                if s.target == "redis":
                    result = redis_set(CONCURRENCY, s.requests(mode), s.value_size)
                elif s.kind == "h2load":
                    assert isinstance(server, Server)
                    result = h2load_set(server.proc.pid, server.address, CONCURRENCY, s.requests(mode), s.value_size)
                else:
                    assert server is not None
                    result = run_tool(s, mode, server)
            except (Unavailable, ScenarioFailed) as exc:
                errors[s.name] = exc
                print(f"round {number}  {s.name:<15} {'skipped' if isinstance(exc, Unavailable) else 'FAILED'}: {exc}")
                continue
            rounds[s.name].append(result)
            cpu = result["server_cpu_us_per_request"]
            print(f"round {number}  {s.name:<15} {result['throughput_per_s']:>9,.0f} req/s  "
                  f"p99 {result['latency_ms']['p99']:8.2f} ms  server CPU "
                  + ("—" if cpu is None else f"{cpu:.0f} µs/req"), flush=True)  # fmt: skip
    return [summarize(s, mode, rounds[s.name], errors.get(s.name)) for s in SCENARIOS]


def start_servers(stack: ExitStack, cdc_names: str) -> dict[str, Server | Etcd | Unavailable]:
    """Start every server the scenarios need; an optional one that cannot start is recorded as Unavailable."""
    node = [sys.executable, str(ROOT / "cmd" / "fluxkv-server"), "--port", "0", "--admin-port", "0"]
    servers: dict[str, Server | Etcd | Unavailable] = {}
    started = []
    for name, argv, env in [
        ("noop", [sys.executable, str(ROOT / "bench" / "noop_server.py"), "--grpc-server", "native"], None),
        ("fluxkv", node, None),
        ("fluxkv+cdc", node, {"FLUX_RABBITMQ_URL": AMQP_URL, "FLUX_CDC_EXCHANGE": cdc_names,
                              "FLUX_CDC_QUEUE": cdc_names}),
    ]:  # fmt: skip
        if env is not None:
            try:
                check_broker(AMQP_URL)
            except Unavailable as exc:
                servers[name] = exc
                continue
            stack.callback(delete_cdc_objects_quietly, cdc_names)  # runs after the node has stopped
        server = Server(name, argv, env)
        stack.callback(server.stop)
        servers[name] = server
        started.append(server)
    try:
        etcd = Etcd()
    except Unavailable as exc:
        servers["etcd"] = exc
    else:
        stack.callback(etcd.stop)
        servers["etcd"] = etcd
    for server in started:
        server.wait_ready()
    return servers


def delete_cdc_objects_quietly(names: str) -> None:
    try:
        asyncio.run(delete_cdc_objects(AMQP_URL, names))
    except Exception as exc:
        print(f"warning: could not delete the CDC exchange and queue {names}: {exc}", file=sys.stderr)


def previous_run(history: Path, mode: str) -> tuple[Path, dict[str, Any]] | None:
    """The latest earlier run of this mode in the history folder, if any."""
    runs = sorted(history.glob(f"suite-*-{mode}/run.json"))
    return (runs[-1].parent, json.loads(runs[-1].read_text())) if runs else None


def write_outputs(record: dict[str, Any], history: Path) -> Path:
    """A new folder in the history with report.md, latency.png, throughput.png and run.json (written last)."""
    run_dir = history / f"suite-{time.strftime('%Y%m%d-%H%M%S')}-{record['mode']}"
    run_dir.mkdir(parents=True)
    suite_report.plot(record["scenarios"], run_dir)
    (run_dir / "report.md").write_text(suite_report.render(record))
    (run_dir / "run.json").write_text(json.dumps(record, indent=1) + "\n")
    return run_dir


def main() -> int:
    p = argparse.ArgumentParser(description="Run FluxKV's benchmark suite and write a report into a history folder.")
    p.add_argument("--quick", action="store_true", help="small runs, one round: checks the suite works (< 2 min)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="history folder (bench/results/)")
    args = p.parse_args()
    mode = MODES["quick" if args.quick else "full"]
    if not TOOL.exists():
        print(f"error: {TOOL} not found: the suite drives the load generator fluxkv-bench", file=sys.stderr)
        return 1

    started = time.monotonic()
    info = machine()
    print(f"FluxKV benchmark suite, {mode.name} mode: {len(SCENARIOS)} scenarios, {mode.rounds} round(s), "
          f"{CONCURRENCY} in flight, {mode.requests} requests per unary scenario")  # fmt: skip
    print(f"machine {info['cpu']}, {info['cores']} cores, load {info['loadavg']}, fluxkv {info['commit']}")
    signal.signal(signal.SIGTERM, interrupt)  # stop the servers on SIGTERM too
    try:
        with ExitStack() as stack:
            servers = start_servers(stack, f"fluxkv-bench-{uuid.uuid4().hex[:8]}")
            results = run_matrix(mode, servers)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError) as exc:  # a FluxKV or no-op server did not start
        print(f"error: {exc}", file=sys.stderr)
        return 1

    previous = previous_run(args.out, mode.name)
    record: dict[str, Any] = {
        "suite": "fluxkv-bench-suite",
        "schema": 1,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": mode.name,
        "machine": info,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "settings": {
            "concurrency": CONCURRENCY,
            "requests": mode.requests,
            "warmup": mode.warmup,
            "keyspace": KEYSPACE,
            "rounds": mode.rounds,
        },
        "scenarios": results,
        "ratios": suite_report.ratios(results),
        "previous": None if previous is None else str(previous[0]),
        "comparison": [] if previous is None else suite_report.compare(previous[1]["scenarios"], results),
        "wall_time_s": time.monotonic() - started,
    }
    run_dir = write_outputs(record, args.out)

    print("\nthroughput against FluxKV's " + suite_report.BASELINE + ": "
          + ", ".join(f"{name} {ratio:.2f}x" for name, ratio in record["ratios"].items()))  # fmt: skip
    if previous is None:
        print(f"no earlier {mode.name} run in {args.out} to compare with")
    else:
        flagged = suite_report.regressions(record["comparison"])
        print(f"against {previous[0].name}: " + ("no regression" if not flagged else "REGRESSIONS"))
        for line in flagged:
            print(f"  REGRESSION {line}")
    print(f"report: {run_dir / 'report.md'} (wall time {time.monotonic() - started:.0f} s)")
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
