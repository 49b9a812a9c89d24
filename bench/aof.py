#!/usr/bin/env python3
"""What the append-only file (AOF) costs a FluxKV node, measured in one run:

1. write QPS: unary Set against nodes with the AOF off and with
   FLUX_AOF_APPEND_FSYNC=no, everysec and always, alternating rounds (unary_set's
   client and rounds), and the group commit of `always` from Info;
2. replay: the records per second of fluxkv.aof.replay() on a file of a million
   changes, in a fresh process, and how long a node takes to serve on that file;
3. rewrite: write latency in windows of an open-loop load while rewrites run,
   against the windows between them, on a node with everysec.

Ratios within the run are what to compare; absolute numbers on a shared 2-core
machine are not. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from unary_set import NODE_ENV, Run, Server, interrupt, row, summarize  # noqa: E402
from unary_set import bench as alternating_rounds  # noqa: E402

from fluxkv.aof import file_format as aof_format  # noqa: E402
from fluxkv.aof.file_format import Header  # noqa: E402
from fluxkv.bench import load as bench_load  # noqa: E402
from fluxkv.bench.histogram import Histogram  # noqa: E402
from fluxkv.bench.report import machine  # noqa: E402
from fluxkv.core.changes import ChangeRecord, Op  # noqa: E402
from fluxkv.core.store import shard_of  # noqa: E402
from fluxkv.proto import kv_pb2, kv_pb2_grpc  # noqa: E402

NODE = [sys.executable, str(ROOT / "cmd" / "fluxkv-server"), "--port", "0"]
OFF = "off"
POLICIES = ("no", "everysec", "always")
# Only rewrites the benchmark asks for: an automatic one (at 64 MiB by default) would land in a random round.
NO_AUTO_REWRITE = {"FLUX_AOF_REWRITE_PERCENT": "0"}
REPLAYED = re.compile(r"replayed: (\d+) records in ([\d.]+) s")
DELETE_SHARE = 0.05  # of the records of the replay file
INFO_TIMEOUT_S = 10.0
MIB = 1 << 20

# Runs in a fresh Python: imports, then times replay() alone (the node's start-up is measured apart).
REPLAY_CHILD = """
import json, resource, sys, time
from fluxkv.aof.replay import replay
from fluxkv.core.store import Store
store = Store()
started = time.perf_counter()
result = replay(sys.argv[1], store)
wall = time.perf_counter() - started
peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"records": result.records, "seconds": result.seconds, "wall_s": wall, "keys": len(store),
                  "revision": result.revision, "max_rss_mib": peak_mib}))
"""


@dataclass(frozen=True)
class Mode:
    """The sizes of a run: quick is a smoke test of the benchmark, full is for numbers."""

    requests: int
    warmup: int
    rounds: int
    replay_records: int
    replay_keys: int
    replay_runs: int
    rewrite_keys: int
    rate: float
    quiet_s: float
    rewrites: int


MODES = {
    "quick": Mode(1_000, 100, 1, 20_000, 4_000, 1, 5_000, 300.0, 1.5, 1),
    "full": Mode(10_000, 1_000, 3, 1_000_000, 200_000, 3, 200_000, 500.0, 8.0, 3),
}


# -- helpers -------------------------------------------------------------------------------------------------------


def start_node(stack: ExitStack, name: str, env: dict[str, str]) -> Server:
    """A `fluxkv-server --port 0` child (its admin port a free one), stopped when `stack` closes."""
    server = Server(name, NODE, {"FLUX_AOF_FILENAME": "", **NODE_ENV, **NO_AUTO_REWRITE, **env})
    stack.callback(server.stop)
    return server


def aof_env(path: Path, policy: str) -> dict[str, str]:
    return {"FLUX_AOF_FILENAME": str(path), "FLUX_AOF_APPEND_FSYNC": policy}


def info(address: str) -> kv_pb2.InfoResponse:
    with grpc.insecure_channel(address) as channel:
        answer: kv_pb2.InfoResponse = kv_pb2_grpc.KVStub(channel).Info(kv_pb2.InfoRequest(), timeout=INFO_TIMEOUT_S)
        return answer


def filesystem(path: Path) -> str:
    """The device, type and mount point of the file system holding `path`."""
    target = os.path.realpath(path)
    best = ("?", "?", "/")
    with open("/proc/self/mounts") as f:
        for line in f:
            device, mount, fstype = line.split()[:3]
            inside = target == mount or target.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best[2]):
                best = (device, fstype, mount)
    return f"{best[0]} ({best[1]}, mounted on {best[2]})"


def latency(values_ns: Iterable[int]) -> dict[str, float]:
    """Count, p50, p99 and max in ms (fluxkv-bench's histogram, so percentiles match its)."""
    h = Histogram()
    for v in values_ns:
        h.record(v)
    return {
        "requests": h.total,
        "p50_ms": h.percentile(50) / 1e6,
        "p99_ms": h.percentile(99) / 1e6,
        "max_ms": h.max / 1e6 if h.total else float("nan"),
    }


def fsync_latency(directory: Path, count: int) -> dict[str, float]:
    """The disk's fsync latency in `directory`: `count` times append 2 KiB (a batch of ~15 records) and fsync."""
    samples = []
    fd = os.open(directory / "fsync-probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for _ in range(count):
            os.write(fd, bytes(2048))
            started = time.perf_counter_ns()
            os.fsync(fd)
            samples.append(time.perf_counter_ns() - started)
    finally:
        os.close(fd)
        os.unlink(directory / "fsync-probe")
    return latency(samples)


def mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


# -- 1. write QPS by fsync policy -----------------------------------------------------------------------------------


def measure_writes(stack: ExitStack, directory: Path, args: argparse.Namespace) -> dict[str, Any]:
    """unary_set's alternating rounds over four nodes: AOF off, no, everysec, always."""
    rng = random.Random(1)  # unary_set's requests: the same keys in the same order for every node
    value = rng.randbytes(args.value_size)
    keys = [f"bench-{i:08d}" for i in range(args.keyspace)]
    requests = [kv_pb2.SetRequest(key=rng.choice(keys), value=value) for _ in range(args.warmup + args.requests)]
    servers = [start_node(stack, OFF, {})]
    servers += [start_node(stack, p, aof_env(directory / f"writes-{p}.aof", p)) for p in POLICIES]
    for s in servers:
        s.wait_ready()
    disk = fsync_latency(directory, args.fsync_probes)
    print(
        f"\n== 1. write QPS: unary Set, {args.concurrency} in flight (closed loop), {args.requests} requests "
        f"after {args.warmup} warm-up per round, {args.keyspace} keys, {args.value_size}-byte values, "
        f"{args.rounds} round(s) alternating {', '.join(s.name for s in servers)}"
    )
    print(
        f"disk      fsync of a 2 KiB append in the AOFs' directory, {disk['requests']} times: p50 {disk['p50_ms']:.2f} "
        f"ms, p99 {disk['p99_ms']:.2f} ms, max {disk['max_ms']:.2f} ms (what `always` waits for)"
    )
    runs = asyncio.run(alternating_rounds(servers, requests, args))
    counters = {s.name: info(s.address).aof for s in servers[1:]}
    for s in servers:
        s.check_alive()

    summaries = {s.name: summarize(runs, s.name) for s in servers}
    off = summaries[OFF]["median_qps"]
    cols = (-10, 11, 9, 9, 9, 16, 18, 8)
    print(
        "\n"
        + row(cols, "fsync", "median QPS", "vs off", "p50 ms", "p99 ms", "srv CPU µs/req", "rounds vs off", "failed")
    )
    for name, summary in summaries.items():
        per_round = round_ratios(runs, name)
        summary["ratio_to_off"] = ratio = summary["median_qps"] / off
        summary["round_ratios_to_off"] = per_round
        spread = f"{min(per_round):.2f}-{max(per_round):.2f}" if name != OFF else ""
        qps, p50, p99 = summary["median_qps"], summary["p50_ms"], summary["p99_ms"]
        cpu = summary["server_cpu_s_per_req"] * 1e6
        cells = (f"{qps:.0f}", f"{ratio:.2f}", f"{p50:.2f}", f"{p99:.2f}", f"{cpu:.1f}", spread, summary["failed"])
        print(row(cols, name, *cells))
    print(
        "(p50/p99 of each node's median round; vs off: median QPS over the AOF-off node's; rounds vs off: the "
        "range of the per-round ratios)"
    )

    cols = (-10, 10, 10, 14, 9, 15, 11, 7)
    print("\n" + row(cols, "fsync", "records", "batches", "records/batch", "fsyncs", "writes delayed", "file", "state"))
    group_commit = {}
    for name, c in counters.items():
        per_batch = c.records_written / c.batches_written if c.batches_written else float("nan")
        group_commit[name] = {
            "records_per_batch": per_batch,
            **{k: getattr(c, k) for k in ("records_written", "batches_written", "fsyncs", "writes_delayed")},
            **{k: getattr(c, k) for k in ("size_bytes", "state", "error")},
        }
        counts = (c.records_written, c.batches_written, f"{per_batch:.1f}", c.fsyncs, c.writes_delayed)
        print(row(cols, name, *counts, mib(c.size_bytes), c.state))
        if c.state != "ok":
            print(f"  WARNING: {name}'s AOF is {c.state}: {c.error}")
    print(
        "(Info's aof counters over the whole run, warm-ups included; records/batch: changes per write() of the "
        "writer thread, and for always per fsync too: group commit)"
    )
    return {"fsync_ms": disk, "summaries": summaries, "aof": group_commit, "runs": [asdict(r) for r in runs]}


def round_ratios(runs: list[Run], name: str) -> list[float]:
    off = {r.round: r.qps for r in runs if r.server == OFF}
    return [r.qps / off[r.round] for r in runs if r.server == name]


# -- 2. replay speed and start-up -----------------------------------------------------------------------------------


def write_replay_file(path: Path, records: int, keys: int, value_size: int) -> dict[str, Any]:
    """An AOF of `records` changes over `keys` keys, written directly with aof_format: Sets of `value_size`
    bytes and DELETE_SHARE deletes, keys drawn uniformly (so most Sets overwrite); the keys left live."""
    rng = random.Random(2)
    value = rng.randbytes(value_size)
    names = [bench_load.key_name(k) for k in range(keys)]
    live: set[str] = set()
    deletes = 0
    now_ms = int(time.time() * 1000)
    started_ms = now_ms - records  # one change a millisecond, ending now
    with open(path, "wb") as f:
        f.write(aof_format.encode_header(Header(f"bench{rng.getrandbits(44):011x}", 0, started_ms)))
        parts: list[bytes] = []
        for revision in range(1, records + 1):
            key = names[rng.randrange(keys)]
            if rng.random() < DELETE_SHARE:
                record = ChangeRecord(revision, Op.DELETE, key, None, 0, started_ms + revision, shard_of(key))
                live.discard(key)
                deletes += 1
            else:
                record = ChangeRecord(revision, Op.SET, key, value, 0, started_ms + revision, shard_of(key))
                live.add(key)
            parts.append(aof_format.encode_change(record))
            if len(parts) == 10_000:
                f.write(b"".join(parts))
                parts.clear()
        f.write(b"".join(parts))
        f.flush()
        os.fsync(f.fileno())  # so that its writeback does not land in a later measurement
    return {
        "records": records,
        "sets": records - deletes,
        "deletes": deletes,
        "keys": keys,
        "live_keys": len(live),
        "value_size": value_size,
        "size_bytes": path.stat().st_size,
    }


def replay_in_fresh_process(path: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", REPLAY_CHILD, str(path)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"replay of {path} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def start_up(name: str, path: Path) -> dict[str, Any]:
    """Time from starting `fluxkv-server` on the AOF at `path` to its `serving on` line, then stop it."""
    with ExitStack() as node_stack:
        started = time.perf_counter()
        server = start_node(node_stack, name, aof_env(path, "everysec"))
        server.wait_ready()
        seconds = time.perf_counter() - started
        answer = info(server.address)
        replayed = next((m for line in server.tail if (m := REPLAYED.search(line))), None)
    return {
        "seconds": seconds,
        "keys": answer.key_count,
        "data_bytes": answer.data_bytes,
        "revision": answer.revision,
        "epoch": answer.epoch,
        "rss_mib": answer.rss_bytes / MIB,
        "replay_logged_s": float(replayed.group(2)) if replayed else None,
    }


def measure_replay(directory: Path, mode: Mode, args: argparse.Namespace) -> dict[str, Any]:
    path = directory / "replay.aof"
    print(
        f"\n== 2. replay: {mode.replay_records} changes over {mode.replay_keys} keys "
        f"({DELETE_SHARE:.0%} deletes, {args.value_size}-byte values), written with aof_format"
    )
    started = time.perf_counter()
    made = write_replay_file(path, mode.replay_records, mode.replay_keys, args.value_size)
    print(
        f"file      {mib(made['size_bytes'])}, {made['sets']} sets, {made['deletes']} deletes, {made['live_keys']} "
        f"live keys (built and fsynced in {time.perf_counter() - started:.1f} s; warm in the page cache)"
    )

    replays = []
    for n in range(1, mode.replay_runs + 1):
        r = replay_in_fresh_process(path)
        r["records_per_s"] = r["records"] / r["seconds"]
        replays.append(r)
        check = "" if r["keys"] == made["live_keys"] else f"  MISMATCH: {made['live_keys']} keys expected"
        print(
            f"replay {n}  {r['records']} records in {r['seconds']:.2f} s: {r['records_per_s']:,.0f} records/s, "
            f"{r['keys']} keys, peak RSS {r['max_rss_mib']:.0f} MiB{check}"
        )
    rate = statistics.median(r["records_per_s"] for r in replays)
    print(
        f"replay    median {rate:,.0f} records/s: {rate / 50_000:.1f}x the 50,000/s Flux-KV claimed "
        "(fluxkv.aof.replay.replay into a Store, in a fresh Python process; import time not counted)"
    )

    startups: dict[str, list[dict[str, Any]]] = {"empty": [], "replay": []}
    for _ in range(mode.replay_runs):  # alternating, so load on the machine hits both alike
        empty = directory / "startup-empty.aof"
        empty.unlink(missing_ok=True)
        startups["empty"].append(start_up("empty AOF", empty))
        startups["replay"].append(start_up("replay AOF", path))
    base = statistics.median(s["seconds"] for s in startups["empty"])
    full = statistics.median(s["seconds"] for s in startups["replay"])
    last = startups["replay"][-1]
    each = ", ".join(f"{s['seconds']:.2f}" for s in startups["replay"])
    print(
        f"start-up  fluxkv-server to 'serving on': {full:.2f} s on this file (median of {mode.replay_runs}: "
        f"{each}) against {base:.2f} s on a new, empty AOF: replay adds {full - base:.2f} s"
    )
    logged = last["replay_logged_s"]
    print(
        f"          the node logged its replay as {logged if logged is not None else '?'} s; it serves "
        f"{last['keys']} keys at revision {last['revision']}, RSS {last['rss_mib']:.0f} MiB"
    )
    if last["keys"] != made["live_keys"]:
        print(f"  WARNING: the node has {last['keys']} keys, the file leaves {made['live_keys']}")
    path.unlink()
    return {
        "file": made,
        "replays": replays,
        "median_records_per_s": rate,
        "startup": startups,
        "startup_median_s": full,
        "startup_empty_median_s": base,
    }


# -- 3. rewrite under load ------------------------------------------------------------------------------------------


class Timeline(Histogram):
    """A Histogram that also keeps each sample with when it was recorded (its request's end, monotonic ns),
    so that bench_load.drive's latencies can be cut into windows afterwards."""

    def __init__(self) -> None:
        super().__init__()
        self.samples: list[tuple[int, int]] = []

    def record(self, value: int) -> None:
        super().record(value)
        self.samples.append((time.monotonic_ns(), value))


@dataclass
class Rewrite:
    started_ns: int
    ended_ns: int
    size_before: int
    size_after: int
    seconds: float  # as the node measured it


async def load_with_rewrites(address: str, mode: Mode, args: argparse.Namespace) -> dict[str, Any]:
    """Preload, then an open-loop Set load at mode.rate: quiet, rewrite, quiet, ..., quiet."""
    plan = bench_load.Plan(
        target="fluxkv",
        engine="lean",
        workload="set",
        nodes=(address,),
        keyspace=mode.rewrite_keys,
        value_size=args.value_size,
        batch=1,
        read_ratio=0.0,
        seed=1,
        vnodes=160,
        conns=1,
        concurrency=args.concurrency,
        requests=None,
        duration_s=None,
        rate=mode.rate,
        warmup=0,
        timeout_s=10.0,
    )
    keys = bench_load.KeySpace(plan)
    conns = bench_load.connections(plan, plan.conns)
    try:
        await bench_load.probe(conns, *bench_load.probe_request(plan))
        started = time.perf_counter()
        for _ in range(2):  # twice: half of what the file holds is overwritten, as a rewrite finds it
            await bench_load.preload(plan, keys, conns)
        preload_s = time.perf_counter() - started
        async with grpc.aio.insecure_channel(address) as channel:
            durable_s = await until_durable(kv_pb2_grpc.KVStub(channel))
        tally = bench_load.Tally()
        tally.hist = timeline = Timeline()
        stopped = asyncio.Event()
        send = bench_load.sender(plan, keys, conns, random.Random(plan.seed))
        load_started = time.monotonic_ns()
        driven = bench_load.drive(send, plan.concurrency, tally, bench_load.RealClock(), rate=plan.rate)
        load = asyncio.create_task(bench_load.until_stopped(driven, stopped))
        rewrites: list[Rewrite] = []
        async with grpc.aio.insecure_channel(address) as channel:
            stub = kv_pb2_grpc.KVStub(channel)
            await asyncio.sleep(1.0 + mode.quiet_s)  # 1 s of warm-up, not counted
            for _ in range(mode.rewrites):
                began = time.monotonic_ns()
                answer = await stub.RewriteAof(kv_pb2.RewriteAofRequest())
                rewrites.append(
                    Rewrite(began, time.monotonic_ns(), answer.size_before, answer.size_after, answer.seconds)
                )
                await asyncio.sleep(mode.quiet_s)
        stopped.set()
        await load
        load_ended = time.monotonic_ns()
    finally:
        await conns.close()
    return {
        "preload_s": preload_s,
        "durable_s": durable_s,
        "timeline": timeline,
        "failures": tally.failures,
        "rewrites": rewrites,
        "measured_from_ns": load_started + 1_000_000_000,
        "load_ended_ns": load_ended,
    }


async def until_durable(stub: kv_pb2_grpc.KVStub, timeout_s: float = 120.0) -> float:
    """Seconds until every change made so far is fsynced (everysec: the preload's fsync must not count as quiet)."""
    started = time.perf_counter()
    target = (await stub.Info(kv_pb2.InfoRequest(), timeout=INFO_TIMEOUT_S)).revision
    while (await stub.Info(kv_pb2.InfoRequest(), timeout=INFO_TIMEOUT_S)).aof.durable_revision < target:
        if time.perf_counter() - started > timeout_s:
            raise RuntimeError(f"the preload was not durable {timeout_s:.0f} s after it ended")
        await asyncio.sleep(0.05)
    return time.perf_counter() - started


def due_during(rewrites: list[Rewrite], done: int, lat: int) -> int | None:
    """The index of the rewrite that was running when a request (ended at `done`, after `lat`) was due, if any."""
    due = done - lat
    return next((i for i, r in enumerate(rewrites) if r.started_ns <= due <= r.ended_ns), None)


def windows(samples: list[tuple[int, int]], rewrites: list[Rewrite], start: int, end: int) -> list[dict[str, Any]]:
    """1-second windows of requests by their due time (end - latency): each window's latency and whether a
    rewrite ran during any of it."""
    width = 1_000_000_000
    buckets: list[list[int]] = [[] for _ in range((end - start) // width)]
    for done, lat in samples:
        i = (done - lat - start) // width
        if 0 <= i < len(buckets):
            buckets[i].append(lat)
    out = []
    for i, lats in enumerate(buckets):
        lo, hi = start + i * width, start + (i + 1) * width
        busy = any(r.started_ns < hi and r.ended_ns > lo for r in rewrites)
        out.append({"second": i, "phase": "rewrite" if busy else "quiet", **latency(lats)})
    return out


def measure_rewrite(stack: ExitStack, directory: Path, mode: Mode, args: argparse.Namespace) -> dict[str, Any]:
    path = directory / "rewrite.aof"
    print(
        f"\n== 3. rewrite under load: fsync everysec, {mode.rewrite_keys} keys preloaded twice (MultiSet), then "
        f"an open-loop Set load at {mode.rate:g}/s (at most {args.concurrency} in flight; latency from each "
        f"request's due time), {mode.rewrites} RewriteAof call(s) with {mode.quiet_s:g} s of quiet around each"
    )
    node = start_node(stack, "rewrite", aof_env(path, "everysec"))
    node.wait_ready()
    result = asyncio.run(load_with_rewrites(node.address, mode, args))
    node.check_alive()
    before_stop = info(node.address)
    rewrites: list[Rewrite] = result["rewrites"]
    timeline: Timeline = result["timeline"]
    start, end = result["measured_from_ns"], result["load_ended_ns"]
    print(
        f"preload   {2 * mode.rewrite_keys} items in {result['preload_s']:.1f} s, all fsynced "
        f"{result['durable_s']:.1f} s after (the load starts then; its first second is not counted)"
    )
    during: list[list[int]] = [[] for _ in rewrites]  # latencies of the requests due during each rewrite
    quiet_lats: list[int] = []
    for done, lat in timeline.samples:
        if start <= done - lat < end:
            i = due_during(rewrites, done, lat)
            (quiet_lats if i is None else during[i]).append(lat)
    per_rewrite = []
    for n, (r, lats) in enumerate(zip(rewrites, during, strict=True), 1):
        per_rewrite.append({**asdict(r), **latency(lats)})
        print(
            f"rewrite {n} {r.seconds:.2f} s (client saw {(r.ended_ns - r.started_ns) / 1e9:.2f} s): "
            f"{mib(r.size_before)} -> {mib(r.size_after)} ({r.size_after / r.size_before:.0%}); {len(lats)} "
            f"requests due during it: p99 {per_rewrite[-1]['p99_ms']:.1f} ms, max {per_rewrite[-1]['max_ms']:.1f} ms"
        )
    rewriting_s = sum(r.ended_ns - r.started_ns for r in rewrites) / 1e9
    phases: dict[str, dict[str, Any]] = {
        "quiet": {**latency(quiet_lats), "seconds": (end - start) / 1e9 - rewriting_s},
        "rewrite": {**latency(x for lats in during for x in lats), "seconds": rewriting_s},
    }
    cut = windows(timeline.samples, rewrites, start, end)
    cols = (-9, 9, 10, 9, 9, 9, 24)
    print("\n" + row(cols, "phase", "seconds", "requests", "p50 ms", "p99 ms", "max ms", "1-s windows' p99 ms"))
    for phase, p in phases.items():
        p99s = [w["p99_ms"] for w in cut if w["phase"] == phase and w["requests"]]
        p["window_p99_ms"] = p99s
        spread = f"median {statistics.median(p99s):.1f}, max {max(p99s):.1f}" if p99s else "-"
        cells = (f"{p['seconds']:.1f}", p["requests"], f"{p['p50_ms']:.2f}", f"{p['p99_ms']:.2f}", f"{p['max_ms']:.2f}")
        print(row(cols, phase, *cells, spread))
    quiet, busy = phases["quiet"], phases["rewrite"]
    pooled = busy["p99_ms"] / quiet["p99_ms"]
    by_window = (
        statistics.median(busy["window_p99_ms"]) / statistics.median(quiet["window_p99_ms"])
        if busy["window_p99_ms"] and quiet["window_p99_ms"]
        else float("nan")
    )
    print(
        f"p99 while rewriting / between rewrites: {pooled:.2f} (all requests of each phase), {by_window:.2f} "
        f"(median of its 1-s windows' p99s); requests by due time; failures: {result['failures'] or 'none'}"
    )
    print("1-s windows, second: p99 ms (* a rewrite ran during it)")
    marks = [f"{w['second']:>3}: {w['p99_ms']:6.1f}{'*' if w['phase'] == 'rewrite' else ' '}" for w in cut]
    for i in range(0, len(marks), 8):
        print("  " + "  ".join(marks[i : i + 8]))

    # The rewritten file must replay to what the node held: restart on it and compare keys, bytes, revision.
    node.stop()
    restarted = start_up("restarted", path)
    held = (before_stop.key_count, before_stop.data_bytes, before_stop.revision, before_stop.epoch)
    same = (restarted["keys"], restarted["data_bytes"], restarted["revision"], restarted["epoch"]) == held
    verdict = (
        "the same as before the stop"
        if same
        else f"DIFFERENT: {before_stop.key_count} keys at revision {before_stop.revision} before the stop"
    )
    print(
        f"restart   on the rewritten file ({mib(path.stat().st_size)}): serving in {restarted['seconds']:.2f} s, "
        f"{restarted['keys']} keys at revision {restarted['revision']}: {verdict}"
    )
    return {
        "phases": phases,
        "windows": cut,
        "rewrites": per_rewrite,
        "failures": result["failures"],
        "preload_s": result["preload_s"],
        "preload_durable_s": result["durable_s"],
        "p99_ratio_pooled": pooled,
        "p99_ratio_window_median": by_window,
        "restart": restarted,
        "restart_matches": same,
        "aof_rewrites_counted": before_stop.aof.rewrites,
    }


# -- main -----------------------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(
        description="What the append-only file costs a FluxKV node: write QPS by fsync "
        "policy, replay speed, start-up, and the rewrite's effect on latency."
    )
    p.add_argument("--quick", action="store_true", help="small sizes, one round: checks the benchmark works")
    p.add_argument("-c", "--concurrency", type=int, default=50, help="requests in flight (default 50)")
    p.add_argument("-n", "--requests", type=int, help="measured Set requests per round and node (full: 10000)")
    p.add_argument("--warmup", type=int, help="unmeasured requests before each round (full: 1000)")
    p.add_argument("--rounds", type=int, help="alternating rounds of part 1 (full: 3)")
    p.add_argument("-r", "--keyspace", type=int, default=10000, help="distinct keys of part 1 (default 10000)")
    p.add_argument("-d", "--value-size", type=int, default=100, help="value size in bytes (default 100)")
    p.add_argument("--fsync-probes", type=int, default=200, help="fsyncs timed to describe the disk (default 200)")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the temporary AOFs go")
    p.add_argument("--json", metavar="FILE", help="append one JSON line with machine, settings and results")
    args = p.parse_args()
    mode = MODES["quick" if args.quick else "full"]
    args.requests = args.requests or mode.requests
    args.warmup = mode.warmup if args.warmup is None else args.warmup
    args.rounds = args.rounds or mode.rounds
    args.conns = 1  # unary_set.measure's setting
    if min(args.concurrency, args.requests, args.keyspace, args.rounds, args.value_size) < 1 or args.warmup < 0:
        p.error("-c, -n, -r, -d and --rounds must be at least 1, --warmup at least 0")

    started = time.monotonic()
    info_ = machine()
    same_disk = os.stat(args.dir).st_dev == os.stat("/tmp").st_dev
    print("append-only file: write QPS by fsync policy, replay speed and start-up, latency during rewrites")
    print(f"machine   {info_['cpu']}, {info_['cores']} cores ({info_['usable_cores']} usable), load {info_['loadavg']}")
    print(
        f"software  Python {info_['python']}, grpcio {info_['grpcio']}, protobuf {info_['protobuf']}, "
        f"fluxkv {info_['commit']}"
    )
    print(
        f"disk      AOFs in a temporary directory under {args.dir}: {filesystem(args.dir)}"
        + ("" if same_disk else " (NOT the device of /tmp)")
    )
    print("nodes     cmd/fluxkv-server --port 0 child processes, FLUX_AOF_REWRITE_PERCENT=0 (rewrites only on demand)")
    print("client    this process: one asyncio loop, on the same machine as the nodes")
    signal.signal(signal.SIGTERM, interrupt)  # SIGTERM stops the nodes too, as in unary_set
    record: dict[str, Any] = {
        "bench": "aof",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": info_,
        "settings": {
            **{k: v for k, v in vars(args).items() if k not in ("json", "dir")},
            "mode": asdict(mode),
            "dir": str(args.dir),
        },
    }
    try:
        with ExitStack() as stack:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fluxkv-bench-aof-", dir=args.dir)))
            with ExitStack() as part:
                record["writes"] = measure_writes(part, directory, args)
            record["replay"] = measure_replay(directory, mode, args)
            with ExitStack() as part:
                record["rewrite"] = measure_rewrite(part, directory, mode, args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, grpc.RpcError) as exc:  # a node did not start, died or failed a call
        print(f"error: {exc}", file=sys.stderr)
        return 1
    record["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    record["wall_time_s"] = time.monotonic() - started
    print(
        f"\nload average at the end: {record['loadavg_end']} (other work on the machine shows here); "
        f"wall time {record['wall_time_s']:.0f} s"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
