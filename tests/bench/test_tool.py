"""fluxkv-bench: its arguments, histogram, output and open-loop accounting in
process, and short real runs against nodes on ephemeral ports. Nothing here
asserts on speed."""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import uvloop

from deploy.private_servers import EtcdServer, free_port
from fluxkv.bench import main as bench
from fluxkv.bench.histogram import RELATIVE_ERROR, Histogram
from fluxkv.bench.load import RealClock, Tally, drive, key_name
from fluxkv.bench.report import Progress, Result, machine, summary, to_json
from fluxkv.cluster.hash_ring import HashRing
from fluxkv.proto import kv_pb2, kv_pb2_grpc
from tests.conftest import GRPC_SERVERS, ROOT, ServerProcess, server_process

BENCH = [sys.executable, str(ROOT / "cmd" / "fluxkv-bench")]
SCHEMA_FIELDS = {
    "tool", "schema", "time", "machine", "settings", "nodes", "requests", "duration_s", "successes", "failures",
    "throughput_per_s", "items_per_s", "latency_ms", "client_cpu_us_per_request", "client_cpu_busiest_process",
    "server_cpu_us_per_request", "client_bound", "interrupted",
}  # fmt: skip
LATENCY_FIELDS = ["min", "avg", "p50", "p90", "p95", "p99", "p99_9", "max"]
KV = "fluxkv.v1.KV/"


@pytest.fixture(scope="module", params=GRPC_SERVERS)
def node(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    """One node for the module's tests, on each gRPC server in turn."""
    with server_process(env={"FLUX_GRPC_SERVER": request.param}) as server:
        yield server


def run_bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout, check=False)


def bench_json(tmp_path: Path, *args: str) -> dict[str, Any]:
    """A run of fluxkv-bench that must complete; its JSON result."""
    out = tmp_path / f"{uuid.uuid4().hex}.json"
    done = run_bench(*args, "--json", str(out))
    assert done.returncode == 0, done.stderr
    record: dict[str, Any] = json.loads(out.read_text())
    return record


def served(server: ServerProcess) -> dict[tuple[str, str], int]:
    """The calls a node served, by method and status code, from its own /metrics (none of its Info calls yet)."""
    port = server.wait_for(r"admin on http://[^/]+:(\d+)/")[0].group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    pattern = r'^fluxkv_requests_total\{method="([^"]+)",code="([^"]+)"\} (\S+)$'
    counts = {(m, code): int(float(n)) for m, code, n in re.findall(pattern, text, re.MULTILINE)}
    return {key: n for key, n in counts.items() if n}


def info(address: str) -> kv_pb2.InfoResponse:
    with grpc.insecure_channel(address) as channel:
        answer: kv_pb2.InfoResponse = kv_pb2_grpc.KVStub(channel).Info(kv_pb2.InfoRequest(), timeout=30)
        return answer


# -- arguments ----------------------------------------------------------------------


def test_defaults() -> None:
    args = bench.parse_args([])
    assert (args.concurrency, args.requests, args.conns, args.processes) == (100, 100_000, 1, 1)
    assert (args.value_size, args.keyspace, args.workload, args.warmup) == (100, 100_000, "set", 1000)
    assert args.addr == ["localhost:50052"] and args.target == "fluxkv" and args.engine == "lean"
    assert args.batch is None and args.read_ratio is None and args.rate is None and args.duration is None


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-t", "mset"], {"batch": 10}),
        (["-t", "mget", "-P", "50"], {"batch": 50}),
        (["-t", "mixed"], {"read_ratio": 0.5}),
        (["-t", "mixed", "--read-ratio", "0.9"], {"read_ratio": 0.9}),
        (["--addr", "a:1,b:2", "--addr", "c:3"], {"addr": ["a:1", "b:2", "c:3"]}),
        (["--duration", "5", "--rate", "200", "--processes", "2"], {"requests": None, "duration": 5.0, "rate": 200.0}),
        (["-c", "8", "--conns", "2", "--processes", "4"], {"concurrency": 8}),
        (["--etcd", "e1:2379,e2:2379"], {"etcd": ["e1:2379", "e2:2379"]}),
        (["--target", "etcd", "-t", "get", "--addr", "h:2379"], {"target": "etcd", "workload": "get"}),
        (["--no-preload", "-t", "get"], {"no_preload": True}),
        (["--engine", "grpcio"], {"engine": "grpcio"}),
    ],
)
def test_good_arguments(argv: list[str], expected: dict[str, Any]) -> None:
    args = bench.parse_args(argv)
    assert {name: getattr(args, name) for name in expected} == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-c", "0"], "must be at least 1, got 0"),
        (["-n", "0"], "must be at least 1"),
        (["-n", "5", "--duration", "1"], "not allowed with argument"),
        (["--rate", "0"], "must be above 0"),
        (["-P", "5"], "-P/--batch applies to -t mset and mget, not -t set"),
        (["-t", "mset", "-P", "1001"], "must be from 1 to 1000"),
        (["--read-ratio", "0.5"], "--read-ratio applies to -t mixed"),
        (["-t", "mixed", "--read-ratio", "1.5"], "must be from 0 to 1"),
        (["-t", "nope"], "invalid choice"),
        (["--engine", "h3"], "invalid choice"),
        (["--target", "etcd", "-t", "mset"], "--target etcd sends -t set or get"),
        (["--target", "etcd", "--addr", "a:1,b:2"], "needs exactly one --addr"),
        (["--addr", "a:1", "--etcd", "e:2379"], "not allowed with argument"),
        (["--addr", "nohost"], "expected HOST:PORT"),
        (["-c", "3", "--conns", "2", "--processes", "2"], "-c 3 is below --conns x --processes (4)"),
        (["--profile", "prof"], "--profile needs --server-pid"),
        (["--server-pid", str(2**22 + 1)], "no such process"),
    ],
)
def test_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: fluxkv-bench" in err and message in err, err


# -- the histogram ------------------------------------------------------------------


def test_histogram_percentiles_of_known_latencies() -> None:
    hist = Histogram()
    values = [i * 1000 for i in range(1, 10_001)]  # 1 µs .. 10 ms, in ns
    for v in random.Random(7).sample(values, len(values)):
        hist.record(v)
    assert (hist.total, hist.min, hist.max, hist.mean()) == (10_000, 1000, 10_000_000, 5_000_500)
    for p in (1, 50, 90, 95, 99, 99.9, 100):
        exact = values[math.ceil(p / 100 * len(values)) - 1]
        assert abs(hist.percentile(p) - exact) <= exact * RELATIVE_ERROR, p


def test_histogram_is_exact_for_small_values_and_bounded_for_any() -> None:
    small = Histogram()
    for v in range(256):
        small.record(v)
    assert [small.percentile(p) for p in (0.5, 50, 100)] == [1, 127, 255]
    rng = random.Random(3)
    samples = [int(rng.lognormvariate(15, 2)) for _ in range(20_000)]
    hist = Histogram()
    for v in samples:
        hist.record(v)
    ordered = sorted(samples)  # the test's own reference, not the tool's method
    for p in (10, 50, 90, 99, 99.9):
        exact = ordered[math.ceil(p / 100 * len(ordered)) - 1]
        assert abs(hist.percentile(p) - exact) <= exact * RELATIVE_ERROR, p


def test_histograms_merge_and_cross_processes() -> None:
    a, b, both = Histogram(), Histogram(), Histogram()
    for i, v in enumerate(random.Random(5).choices(range(1, 10**9), k=5000)):
        (a if i % 2 else b).record(v)
        both.record(v)
    merged = Histogram.from_dict(a.to_dict())
    merged.merge(Histogram.from_dict(b.to_dict()))
    assert merged.counts == both.counts
    assert (merged.total, merged.sum, merged.min, merged.max) == (both.total, both.sum, both.min, both.max)
    assert math.isnan(Histogram().percentile(50))


# -- output -------------------------------------------------------------------------


def result(failures: dict[str, int], batch: int = 1, client_cpu_s: float = 0.01, busiest: float = 0.4) -> Result:
    hist = Histogram()
    for ms in range(1, 101):  # 1 .. 100 ms
        hist.record(ms * 1_000_000)
    return Result("2026-11-22T00:00:00+00:00", hist, failures, 2.0, batch, client_cpu_s, busiest, 0.02, False)


def test_json_record_counts_only_successes_as_throughput() -> None:
    args = bench.parse_args(["-t", "mset", "-P", "10", "--server-pid", "1"])
    record = to_json(result({"UNAVAILABLE": 3, "DEADLINE_EXCEEDED": 1}, batch=10), vars(args), ["n:1"], machine())
    assert set(record) == SCHEMA_FIELDS
    assert record["tool"] == "fluxkv-bench" and record["schema"] == 1
    assert (record["requests"], record["successes"]) == (104, 100)
    assert record["failures"] == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 3}
    assert (record["throughput_per_s"], record["items_per_s"]) == (50.0, 500.0)
    assert list(record["latency_ms"]) == LATENCY_FIELDS
    assert record["latency_ms"]["min"] == 1.0 and record["latency_ms"]["max"] == 100.0
    assert abs(record["latency_ms"]["p50"] - 50) <= 50 * RELATIVE_ERROR
    assert record["client_cpu_us_per_request"] == round(0.01e6 / 104, 2)
    assert record["server_cpu_us_per_request"] == round(0.02e6 / 104, 2)
    assert record["client_cpu_busiest_process"] == 0.4 and record["client_bound"] == []
    assert record["settings"]["batch"] == 10 and record["settings"]["workload"] == "mset"
    json.dumps(record)  # serializable as is
    text = summary(record)
    assert "failures:   DEADLINE_EXCEEDED 1, UNAVAILABLE 3" in text
    assert "50.0 requests/s (successful requests only)" in text and "500.0 items/s" in text
    assert "p99.9" in text and "pid 1 and its children" in text and "busiest process: 40% of a core" in text
    assert "lean engine" in text and "WARNING" not in text


@pytest.mark.parametrize(
    ("client_cpu_s", "busiest", "reasons"),
    [
        (0.03, 0.5, ["the client's CPU per request (300.0 µs) is above the server's (200.0 µs)"]),
        (0.01, 0.95, ["a client process was busy 95% of a core"]),
        (0.03, 1.02, ["the client's CPU per request (300.0 µs) is above the server's (200.0 µs)",
                      "a client process was busy 102% of a core"]),
    ],
)  # fmt: skip
def test_a_client_that_may_set_the_pace_is_named_in_the_summary_and_the_json(
    client_cpu_s: float, busiest: float, reasons: list[str]
) -> None:
    args = bench.parse_args(["--server-pid", "1"])
    record = to_json(result({}, client_cpu_s=client_cpu_s, busiest=busiest), vars(args), ["n:1"], machine())
    assert record["client_bound"] == reasons
    text = summary(record)
    assert "WARNING: the client may be the bottleneck, not the server:" in text
    assert all(f"    {reason}\n" in text for reason in reasons)


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    bar = Progress(1000, None, tty)
    bar.begin()
    bar.update(500, 2)
    bar.finish()
    start, redraw = tty.getvalue().split("\n", 1)
    assert start == "fluxkv-bench: measuring 1000 requests"
    assert redraw.startswith("\r[###############               ]  50% 500/1000") and "errors 2" in redraw
    plain = io.StringIO()
    lines = Progress(1000, None, plain)
    lines.begin()
    for done in range(0, 1001, 50):
        lines.update(done, 0)
    steps = [line.split()[1] for line in plain.getvalue().splitlines()[1:]]
    assert steps == [f"{p}%" for p in range(10, 101, 10)]


# -- open loop: latency from the due time -----------------------------------------


class FakeClock:
    """Virtual time in ns: sleeping jumps to the wake-up time, calls take the time the test says."""

    def __init__(self) -> None:
        self.t = 0

    def now(self) -> int:
        return self.t

    async def sleep_until(self, t: int) -> None:
        self.t = max(self.t, t)
        await asyncio.sleep(0)


def stalling_call(clock: FakeClock, stall_at: int, stall_ns: int, service_ns: int) -> Any:
    """A call that takes `service_ns`, except the `stall_at`-th, which takes `stall_ns`."""
    calls = 0

    async def send(slot: int) -> str | None:
        nonlocal calls
        clock.t += stall_ns if calls == stall_at else service_ns
        calls += 1
        await asyncio.sleep(0)
        return None

    return send


async def test_open_loop_charges_a_stall_to_every_request_due_during_it() -> None:
    # 1000 requests/s (one due every 1 ms), each served in 0.1 ms, except the
    # 11th, which stalls for 100 ms. The ~100 requests due during the stall are
    # sent late; measured from their due times they show the wait.
    clock, tally = FakeClock(), Tally()
    await drive(stalling_call(clock, 10, 100_000_000, 100_000), 1, tally, clock, limit=200, rate=1000)
    hist = tally.hist
    assert hist.total == 200 and tally.done == 200
    assert abs(hist.max - 100_100_000) <= 100_100_000 * RELATIVE_ERROR
    # Request 10 + j waits 100.1 - 0.9 j ms: j = 0..66 (67 requests, ranks 134-200) wait 40 ms or more.
    assert hist.percentile(67) >= 40_000_000 > hist.percentile(66.5)
    # The requests the stall did not catch: their service time.
    assert hist.percentile(40) == pytest.approx(100_000, rel=RELATIVE_ERROR)


async def test_closed_loop_shows_the_stall_in_one_request_only() -> None:
    # The same calls, closed loop: latency from the actual send (what open loop avoids).
    clock, tally = FakeClock(), Tally()
    await drive(stalling_call(clock, 10, 100_000_000, 100_000), 1, tally, clock, limit=200)
    assert tally.hist.max == 100_000_000
    assert tally.hist.percentile(99) == pytest.approx(100_000, rel=RELATIVE_ERROR)


async def test_open_loop_with_a_duration_sends_what_is_due_within_it() -> None:
    clock, tally = FakeClock(), Tally()
    await drive(stalling_call(clock, -1, 0, 100_000), 1, tally, clock, duration_s=0.05, rate=1000)
    assert tally.done == 50 and tally.hist.max == 100_000


# -- real runs ----------------------------------------------------------------------


def test_a_run_against_a_node_writes_json_and_history(node: ServerProcess, tmp_path: Path) -> None:
    out, history = tmp_path / "result.json", tmp_path / "history.jsonl"
    argv = ["--addr", node.address, "-n", "2000", "-c", "20", "--warmup", "100", "--history", str(history)]
    done = run_bench(*argv, "--json", str(out), "--server-pid", str(node.proc.pid))
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert set(record) == SCHEMA_FIELDS
    assert (record["successes"], record["requests"], record["failures"]) == (2000, 2000, {})
    assert record["interrupted"] is False and record["nodes"] == [node.address]
    assert record["server_cpu_us_per_request"] > 0 and record["client_cpu_us_per_request"] > 0
    assert 0 < record["client_cpu_busiest_process"] and isinstance(record["client_bound"], list)
    assert all(record["latency_ms"][name] > 0 for name in LATENCY_FIELDS)
    assert record["machine"]["fluxkv"] and record["settings"]["concurrency"] == 20
    assert "====== SET on fluxkv ======" in done.stdout and "successes:  2000" in done.stdout
    assert run_bench(*argv, "-t", "get", "-r", "500").returncode == 0
    lines = history.read_text().splitlines()
    assert [json.loads(line)["settings"]["workload"] for line in lines] == ["set", "get"]


@pytest.mark.parametrize(
    "argv",
    [
        ["-t", "mixed", "--read-ratio", "0.8", "-r", "1000"],
        ["-t", "mset", "-P", "20"],
        ["-t", "mget", "-P", "5", "-r", "300", "--conns", "2"],
        ["--rate", "2000", "--conns", "2"],
    ],
)
def test_workloads_in_process(node: ServerProcess, tmp_path: Path, argv: list[str]) -> None:
    out = tmp_path / "result.json"
    code = bench.run(["--addr", node.address, "-n", "1000", "-c", "20", "--warmup", "50", "--json", str(out), *argv])
    record = json.loads(out.read_text())
    assert code == 0 and (record["successes"], record["failures"]) == (1000, {})
    batch = record["settings"]["batch"] or 1
    assert record["items_per_s"] == pytest.approx(record["throughput_per_s"] * batch, rel=1e-3)


# What the node counted of each run, from its /metrics and Info. Every run probes the first
# key once before the load and once on each channel of each client process; the warmup's
# requests reach the node too. Each write is one revision, each MultiSet item too.
@pytest.mark.parametrize(
    ("argv", "method"),
    [
        (["-t", "set"], "Set"),
        (["-t", "set", "--engine", "grpcio"], "Set"),
        (["-t", "set", "--rate", "2000", "--conns", "2"], "Set"),
        (["-t", "set", "--processes", "2", "-n", "1001"], "Set"),
        (["-t", "get", "-r", "500"], "Get"),
        (["-t", "mset", "-P", "20"], "MultiSet"),
        (["-t", "mget", "-P", "5", "-r", "300", "--conns", "2"], "MultiGet"),
    ],
)
def test_each_workload_sends_what_the_node_counts(
    server: ServerProcess, tmp_path: Path, argv: list[str], method: str
) -> None:
    record = bench_json(tmp_path, "--addr", server.address, "-n", "1000", "-c", "20", "--warmup", "50", *argv)
    calls, node = served(server), info(server.address)
    s = record["settings"]
    requests, batch, reads = s["requests"], s["batch"] or 1, s["workload"] in ("get", "mget")
    assert (record["successes"], record["failures"], record["requests"]) == (requests, {}, requests)
    probes = 1 + s["conns"] * s["processes"]
    preload = {(KV + "MultiSet", "OK"): 1} if reads else {}  # the key space fits one MultiSet
    assert calls == {(KV + method, "OK"): probes + s["warmup"] + requests, **preload}
    # Reads change nothing after the preload; each write is a revision (an mset probe writes one key).
    assert node.revision == (s["keyspace"] if reads else probes + (s["warmup"] + requests) * batch)
    if s["rate"]:  # request i is due at i / rate
        assert record["duration_s"] >= (requests - 1) / s["rate"]


def test_mixed_reads_and_writes_add_up_to_the_node_s_counts(server: ServerProcess, tmp_path: Path) -> None:
    argv = ["--addr", server.address, "-t", "mixed", "--read-ratio", "0.7", "-r", "1000", "-n", "2000"]
    record = bench_json(tmp_path, *argv, "-c", "20", "--warmup", "100")
    calls, node = served(server), info(server.address)
    gets, sets = calls.pop((KV + "Get", "OK")), calls.pop((KV + "Set", "OK"))
    assert calls == {(KV + "MultiSet", "OK"): 1} and (record["successes"], record["failures"]) == (2000, {})
    assert gets + sets == 2 + 100 + 2000 and 0.3 < sets / gets < 0.6  # the probes are Gets
    assert (node.revision, node.key_count) == (1000 + sets, 1000)


@pytest.mark.usefixtures("grpc_server")
def test_a_status_the_node_refuses_with_is_a_failure_by_its_code(tmp_path: Path) -> None:
    # Values over FLUX_MAX_VALUE_BYTES: every Set of the mixed load answers INVALID_ARGUMENT
    # (with HTTP status 200), every Get (of a missing key) succeeds.
    with server_process(env={"FLUX_MAX_VALUE_BYTES": "50"}) as node:
        argv = ["--addr", node.address, "-t", "mixed", "--no-preload", "-d", "100", "-n", "1000", "--warmup", "0"]
        record = bench_json(tmp_path, *argv, "-c", "10")
        calls, revision = served(node), info(node.address).revision
    refused = record["failures"]["INVALID_ARGUMENT"]
    assert set(record["failures"]) == {"INVALID_ARGUMENT"} and record["successes"] + refused == 1000
    assert calls == {(KV + "Get", "OK"): record["successes"] + 2, (KV + "Set", "INVALID_ARGUMENT"): refused}
    assert revision == 0 and 300 < refused < 700


@pytest.mark.usefixtures("grpc_server")
def test_etcd_routing_sends_every_key_to_its_owner(etcd_server: EtcdServer, tmp_path: Path) -> None:
    prefix = f"/fluxkv-bench-test/{uuid.uuid4().hex[:8]}/"
    env = {"FLUX_ETCD_ENDPOINTS": etcd_server.endpoint, "FLUX_ETCD_PREFIX": prefix}
    with server_process(env=env) as a, server_process(env=env) as b:
        a.wait_for("registered in etcd")
        b.wait_for("registered in etcd")
        argv = ["--etcd", etcd_server.endpoint, "--etcd-prefix", prefix, "-t", "mset", "-P", "5", "-n", "500"]
        record = bench_json(tmp_path, *argv, "-c", "10", "--warmup", "50")
        nodes = {n: info(n) for n in record["nodes"]}
    assert sorted(nodes) == sorted([a.address, b.address]) and (record["successes"], record["failures"]) == (500, {})
    # Each call went to the owner of its keys: only the probes of key 0, which every node gets, were forwarded.
    owner = HashRing(record["nodes"], 160).owner(key_name(0))
    etcd = {n: next(s.detail for s in i.subsystems if s.name == "etcd") for n, i in nodes.items()}
    forwarded = {n: re.findall(r"(\d+) calls forwarded", detail) for n, detail in etcd.items()}
    assert forwarded == {n: ["0" if n == owner else "2"] for n in nodes}
    assert sum(i.revision for i in nodes.values()) == 4 + 5 * (50 + 500)
    assert all(i.revision > 500 for i in nodes.values())  # both took a share


def test_client_processes_merge_their_counts(node: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    done = run_bench("--addr", node.address, "-n", "1001", "-c", "10", "--processes", "2", "--json", str(out))
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert (record["successes"], record["failures"]) == (1001, {}) and 0 < record["client_cpu_busiest_process"]


def test_a_server_that_cannot_be_reached_exits_3_before_the_load() -> None:
    port = free_port()
    done = run_bench("--addr", f"127.0.0.1:{port}", "-n", "10", timeout=30)
    assert done.returncode == 3
    assert done.stderr == f"fluxkv-bench: cannot reach 127.0.0.1:{port} (Connection refused)\n"
    assert done.stdout == ""


def test_ctrl_c_prints_the_partial_summary_and_exits_130(node: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    argv = [*BENCH, "--addr", node.address, "--duration", "60", "-c", "10", "--warmup", "10", "--json", str(out)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    started = proc.stderr.readline()  # the measured phase has begun
    assert started.startswith("fluxkv-bench: measuring"), started
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "INTERRUPTED: partial results" in stdout and "Traceback" not in stderr
    record = json.loads(out.read_text())
    assert record["interrupted"] is True and record["failures"] == {}


def test_profile_writes_speedscope_and_flame_graph(node: ServerProcess, tmp_path: Path) -> None:
    prof = tmp_path / "prof"
    argv = ["--addr", node.address, "-n", "500", "-c", "10", "--warmup", "0", "--server-pid", str(node.proc.pid)]
    done = run_bench(*argv, "--profile", str(prof))
    assert done.returncode == 0, done.stderr
    assert json.loads((prof / "server.speedscope.json").read_text())["$schema"].startswith("https://www.speedscope")
    assert (prof / "server-flamegraph.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.usefixtures("grpc_server")
def test_etcd_discovery_and_the_etcd_reference(etcd_server: EtcdServer, tmp_path: Path) -> None:
    prefix = f"/fluxkv-bench-test/{uuid.uuid4().hex[:8]}/"
    env = {"FLUX_ETCD_ENDPOINTS": etcd_server.endpoint, "FLUX_ETCD_PREFIX": prefix}
    with server_process("--workers", "2", env=env) as server:
        # Both workers registered: each serving line says "registration ... unregistered" when it comes first,
        # which a plain "registered" would also match, and the bench then found one node in etcd.
        server.wait_for(r"registered in etcd as", count=2)
        out = tmp_path / "cluster.json"
        argv = ["--etcd", etcd_server.endpoint, "--etcd-prefix", prefix, "-t", "mget", "-r", "500", "-n", "500"]
        done = run_bench(*argv, "-c", "10", "--json", str(out))
        assert done.returncode == 0, done.stderr
        record = json.loads(out.read_text())
        assert len(record["nodes"]) == 2 and (record["successes"], record["failures"]) == (500, {})
    out = tmp_path / "etcd.json"
    done = run_bench("--target", "etcd", "-t", "get", "--addr", etcd_server.endpoint, "-r", "100", "-n", "300",
                     "-c", "10", "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert (record["successes"], record["failures"]) == (300, {}) and "GET on etcd" in done.stdout


def test_the_results_name_the_commit_of_the_checkout_they_ran_from() -> None:
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    assert head.returncode == 0, head.stderr  # the suite runs from a checkout
    assert machine()["commit"] in (head.stdout.strip(), head.stdout.strip() + "+dirty")


def test_the_real_clock_never_wakes_before_the_moment_on_uvloop() -> None:
    # uvloop's timers count whole milliseconds: a bare asyncio.sleep ended early in about 40% of these.
    async def early_wakeups() -> int:
        clock, early = RealClock(), 0
        for i in range(300):
            t = time.monotonic_ns() + 300_000 + (i % 7) * 100_000
            await clock.sleep_until(t)
            early += time.monotonic_ns() < t
        return early

    assert uvloop.run(early_wakeups()) == 0
