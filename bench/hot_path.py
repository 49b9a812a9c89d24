#!/usr/bin/env python3
"""FluxKV's own cost on the hot path, in process (no gRPC), in one run:

1. per operation: Store.set and Store.get (the bare store, and with the watch
   history attached as a node attaches it), and KVHandlers' Set, Get, MultiSet
   and MultiGet (100 items a call), each request parsed from its bytes and the
   response serialized as the transport does, with the append-only file off and
   with FLUX_AOF_APPEND_FSYNC no and everysec. The cost is the process's CPU
   time (every thread: the file's writer thread is counted) per call and per
   item, the median of the rounds;
2. memory per key: N keys with values of D bytes set into a store with the
   node's sinks, in a fresh process, RSS over the same process before (the node's
   modules imported, the store empty), and bytes per key; Info's data_bytes is
   checked against the keys and values written;
3. replay: records per second of fluxkv.aof.replay() on a file of a million
   changes (bench/aof.py's file), in a fresh process.

The issue 14 targets are printed beside the figures. Ratios within one run are
what to compare on a shared machine. See bench/README.md.

    .venv/bin/python bench/hot_path.py [--quick] [--only ops|memory|replay] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fluxkv.aof.file import AofSettings, AppendOnlyFile  # noqa: E402
from fluxkv.bench.load import key_name  # noqa: E402
from fluxkv.bench.report import machine  # noqa: E402
from fluxkv.config import Settings  # noqa: E402
from fluxkv.core.store import Store  # noqa: E402
from fluxkv.core.watch import WatchHub  # noqa: E402
from fluxkv.proto import kv_pb2 as pb  # noqa: E402
from fluxkv.server.handlers import KVHandlers, WritePath  # noqa: E402

MIB = 1024 * 1024
BATCH = 100
POLICIES = ("off", "no", "everysec")
# Issue 14's targets.
TARGET_ITEM_US = 6.0
TARGET_KEY_BYTES = 200
TARGET_REPLAY_PER_S = 500_000


@dataclass(frozen=True)
class Mode:
    calls: int  # unary calls per measurement (batch calls: calls / BATCH)
    rounds: int
    keys: int  # memory: keys set
    replay_records: int
    replay_keys: int


MODES = {
    "quick": Mode(5_000, 1, 100_000, 50_000, 10_000),
    "full": Mode(50_000, 5, 1_000_000, 1_000_000, 200_000),
}


class _Node:
    """What Info would ask of a node: not used on these paths."""

    node_id = address = version = "bench"


def cpu_us_per(fn: Callable[[], None], count: int) -> float:
    """CPU µs of this process (all threads) per one of `count` things fn does."""
    started = time.process_time()
    fn()
    return (time.process_time() - started) / count * 1e6


# -- 1. per operation ----------------------------------------------------------------------------------------------


def store_ops(mode: Mode, value: bytes, with_hub: bool) -> dict[str, float]:
    store = Store()
    if with_hub:
        settings = Settings()
        store.attach_sink(WatchHub(settings.watch_history, settings.watch_history_bytes))
    keys = [key_name(i) for i in range(10_000)]
    n = mode.calls

    def sets() -> None:
        set_ = store.set
        for i in range(n):
            set_(keys[i % 10_000], value)

    def gets() -> None:
        get = store.get
        for i in range(n):
            get(keys[i % 10_000])

    return {"set": cpu_us_per(sets, n), "get": cpu_us_per(gets, n)}


async def handler_ops(mode: Mode, value: bytes, policy: str, directory: Path) -> dict[str, float]:
    settings = Settings()
    store = Store()
    store.attach_sink(WatchHub(settings.watch_history, settings.watch_history_bytes))
    aof = None
    if policy != "off":
        path = directory / f"hot-path-{policy}-{time.monotonic_ns()}.aof"
        aof = AppendOnlyFile(AofSettings(str(path), policy, 64 * MIB, 0, settings.aof_buffer_bytes), store)
        aof.open()
        store.attach_sink(aof)
        aof.start()
    kv = KVHandlers(store, settings, _Node(), WritePath(None, aof), watch_hub=store._sinks[0])  # type: ignore[arg-type]
    keys = [key_name(i) for i in range(10_000)]
    sets = [pb.SetRequest(key=k, value=value).SerializeToString() for k in keys]
    gets = [pb.GetRequest(key=k).SerializeToString() for k in keys]
    msets = [
        pb.MultiSetRequest(items=[pb.SetRequest(key=k, value=value) for k in keys[i : i + BATCH]]).SerializeToString()
        for i in range(0, len(keys), BATCH)
    ]
    mgets = [pb.MultiGetRequest(keys=keys[i : i + BATCH]).SerializeToString() for i in range(0, len(keys), BATCH)]

    async def drive(call: Callable[[Any], Awaitable[Any]], parse: Callable[[bytes], Any], bodies: list[bytes],
                    calls: int) -> float:  # fmt: skip
        """CPU µs per call: parse, handle, serialize, as the transport does (no gRPC)."""
        started = time.process_time()
        for i in range(calls):
            (await call(parse(bodies[i % len(bodies)]))).SerializeToString()
        if aof is not None:
            await aof.sync()  # what the writer thread owes for these calls is counted too
        return (time.process_time() - started) / calls * 1e6

    n, batches = mode.calls, max(1, mode.calls // BATCH)
    result = {
        "Set": await drive(kv.set, pb.SetRequest.FromString, sets, n),
        "Get": await drive(kv.get, pb.GetRequest.FromString, gets, n),
        "MultiSet": await drive(kv.multi_set, pb.MultiSetRequest.FromString, msets, batches),
        "MultiGet": await drive(kv.multi_get, pb.MultiGetRequest.FromString, mgets, batches),
    }
    if aof is not None:
        await aof.close()
        path.unlink()
    return result


def measure_ops(mode: Mode, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    print(f"\n== 1. per operation: {mode.calls} unary calls, {mode.calls // BATCH} batch calls of {BATCH} items, "
          f"{args.value_size}-byte values, 10,000 keys, {mode.rounds} rounds")  # fmt: skip
    value = os.urandom(args.value_size)
    rounds: list[dict[str, float]] = []
    for rnd in range(1, mode.rounds + 1):
        figures: dict[str, float] = {}
        for name, us in store_ops(mode, value, with_hub=False).items():
            figures[f"Store.{name}"] = us
        for name, us in store_ops(mode, value, with_hub=True).items():
            figures[f"Store.{name} +watch"] = us
        for policy in POLICIES:
            for name, us in asyncio.run(handler_ops(mode, value, policy, directory)).items():
                figures[f"{name} aof={policy}"] = us
        rounds.append(figures)
        print(f"round {rnd}  " + "  ".join(f"{k} {v:.2f}" for k, v in figures.items()), flush=True)
    print(f"\n{'path':<28}{'µs/call':>9}{'range':>17}{'µs/item':>9}  target")
    medians: dict[str, float] = {}
    for name in rounds[0]:
        values = [r[name] for r in rounds]
        medians[name] = median = statistics.median(values)
        batch = name.startswith("Multi")
        item = f"{median / BATCH:9.2f}" if batch else f"{'':9}"
        target = f"  ≤ {TARGET_ITEM_US:g} µs/item" if batch else ""
        print(f"{name:<28}{median:9.2f}{f'{min(values):.2f}-{max(values):.2f}':>17}{item}{target}")
    print("(CPU time of the whole process per call, all threads: the file's writer thread included; a handler call "
          "parses its request and serializes its response; no gRPC, no metrics, no call context)")  # fmt: skip
    return {"rounds": rounds, "median_us": medians}


# -- 2. memory per key ---------------------------------------------------------------------------------------------

MEMORY_CHILD = """
import gc, json, sys
sys.path.insert(0, sys.argv[1])
import fluxkv.server.node  # the node's modules, as an empty node has them
from fluxkv.bench.load import key_name
from fluxkv.config import Settings
from fluxkv.core.store import Store
from fluxkv.core.watch import WatchHub

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096

keys, size = int(sys.argv[2]), int(sys.argv[3])
settings = Settings()
store = Store()
store.attach_sink(WatchHub(settings.watch_history, settings.watch_history_bytes))
gc.collect()
empty = rss()
value = bytes(size)
expected = 0
for i in range(keys):
    key = key_name(i)
    # a fresh value object per key, as a request brings it
    store.set(key, value[:-1] + b"x")
    expected += len(key) + size
gc.collect()
full = rss()
print(json.dumps({"keys": len(store), "empty_rss": empty, "full_rss": full, "data_bytes": store.data_bytes,
                  "expected_bytes": expected}))
"""


def measure_memory(mode: Mode, args: argparse.Namespace) -> dict[str, Any]:
    print(f"\n== 2. memory: {mode.keys} keys ({key_name(0)!r}...) of {args.value_size}-byte values, in a fresh "
          f"process with the watch history attached, {max(1, min(mode.rounds, 3))} processes")  # fmt: skip
    runs = []
    for _ in range(max(1, min(mode.rounds, 3))):
        done = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(ROOT), str(mode.keys), str(args.value_size)],
                              capture_output=True, text=True, check=False)  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"the memory child failed:\n{done.stderr}")
        r = json.loads(done.stdout)
        r["bytes_per_key"] = (r["full_rss"] - r["empty_rss"]) / r["keys"]
        runs.append(r)
        exact = "exact" if r["data_bytes"] == r["expected_bytes"] else f"WRONG ({r['expected_bytes']} expected)"
        print(f"empty {r['empty_rss'] / MIB:.1f} MiB, full {r['full_rss'] / MIB:.1f} MiB: "
              f"{r['bytes_per_key']:.0f} B per key; data_bytes {r['data_bytes']} {exact}", flush=True)  # fmt: skip
    per_key = statistics.median(r["bytes_per_key"] for r in runs)
    full = statistics.median(r["full_rss"] for r in runs)
    print(f"memory    median {per_key:.0f} B per key (target ≤ {TARGET_KEY_BYTES}), {full / MIB:.0f} MiB RSS with "
          f"{mode.keys} keys (target for 1M keys: ≤ 250 MiB including the empty node)")  # fmt: skip
    return {"runs": runs, "median_bytes_per_key": per_key, "median_full_rss": full}


# -- 3. replay -----------------------------------------------------------------------------------------------------


def measure_replay(mode: Mode, args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    from aof import replay_in_fresh_process, write_replay_file

    path = directory / "hot-path-replay.aof"
    print(f"\n== 3. replay: {mode.replay_records} changes over {mode.replay_keys} keys, {args.value_size}-byte values "
          "(bench/aof.py's file: 5% deletes)")  # fmt: skip
    made = write_replay_file(path, mode.replay_records, mode.replay_keys, args.value_size)
    runs = []
    for _ in range(max(1, min(mode.rounds, 3))):
        r = replay_in_fresh_process(path)
        r["records_per_s"] = r["records"] / r["seconds"]
        runs.append(r)
        check = "" if r["keys"] == made["live_keys"] else f"  MISMATCH: {made['live_keys']} keys expected"
        print(f"replay    {r['records']} records in {r['seconds']:.2f} s: {r['records_per_s']:,.0f} records/s{check}",
              flush=True)  # fmt: skip
    rate = statistics.median(r["records_per_s"] for r in runs)
    print(f"replay    median {rate:,.0f} records/s (target ≥ {TARGET_REPLAY_PER_S:,}): a million records in "
          f"{1e6 / rate:.1f} s")  # fmt: skip
    path.unlink()
    return {"file": made, "runs": runs, "median_records_per_s": rate}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="small sizes, one round: checks the benchmark works")
    p.add_argument("--only", action="append", choices=("ops", "memory", "replay"), help="only this part (repeatable)")
    p.add_argument("--rounds", type=int, help="rounds of part 1, processes of parts 2 and 3 (at most 3) (full: 5)")
    p.add_argument("-d", "--value-size", type=int, default=100, help="value size in bytes (default 100)")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the temporary AOFs go")
    p.add_argument("--json", metavar="FILE", help="append one JSON line with machine, settings and results")
    args = p.parse_args()
    mode = MODES["quick" if args.quick else "full"]
    if args.rounds:
        mode = Mode(mode.calls, args.rounds, mode.keys, mode.replay_records, mode.replay_keys)
    parts = args.only or ["ops", "memory", "replay"]
    info = machine()
    print("hot path: FluxKV's own cost per operation, per key and per replayed record, in process (no gRPC)")
    print(f"machine   {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), load {info['loadavg']}")
    print(f"software  Python {info['python']}, protobuf {info['protobuf']}, fluxkv {info['commit']}")
    record: dict[str, Any] = {"bench": "hot_path", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info,
                              "settings": {"mode": asdict(mode), "value_size": args.value_size}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fluxkv-bench-hot-path-", dir=args.dir) as tmp:
        if "ops" in parts:
            record["ops"] = measure_ops(mode, args, Path(tmp))
        if "memory" in parts:
            record["memory"] = measure_memory(mode, args)
        if "replay" in parts:
            record["replay"] = measure_replay(mode, args, Path(tmp))
    record["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(f"\nload average at the end: {record['loadavg_end']} (other work on the machine shows here)")
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
