#!/usr/bin/env python3
"""Issue 14's four targets, measured in one run on this machine:

1. unary Set and Get: FluxKV's own server CPU per call end to end, a node on
   pygrpc-native minus a bare pygrpc-native no-op under the same h2load load
   (bench/own_cost.py; AOF off), at most 15 µs;
2. MultiSet and MultiGet of 100 keys a call: the node's server CPU per item end to
   end (bench/own_cost.py, the same run: the AOF off, `no` and `everysec`), at most
   6 µs; the no-op's figure is printed beside it;
3. memory: bytes per key for 1M keys of 100-byte values and the RSS with them
   (bench/hot_path.py's part 2), at most 200 B and 250 MiB, Info's byte count exact;
4. replay: records per second of a 1M-record append-only file (bench/hot_path.py's
   part 3), at least 500,000.

Prints the machine and its load average at the start and the end, every figure
beside its target, and appends one JSON line with --json. About 6 minutes on a quiet
2-core machine with the defaults. See bench/README.md (issue 14).

    flock /tmp/fluxkv-bench.lock .venv/bin/python bench/issue14.py [--rounds 12] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import hot_path  # noqa: E402
import own_cost  # noqa: E402

TARGET_OWN_US = 15.0
UNARY_POLICY = "off"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    own_cost.add_arguments(p)
    p.set_defaults(rounds=12, methods=[*own_cost.UNARY, *own_cost.BATCH], aof=list(own_cost.POLICIES))
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the replay's file goes")
    p.add_argument("--json", metavar="FILE", help="append one JSON line: machine, settings, every round")
    args = p.parse_args()
    info = hot_path.machine()
    print("issue 14: FluxKV's own cost per call, per item, per key and per replayed record, in one run")
    print(f"machine   {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), load {info['loadavg']}")
    print(f"software  Python {info['python']}, protobuf {info['protobuf']}, fluxkv {info['commit']}")
    started = time.perf_counter()

    print("\n== 1 and 2. end to end: h2load against a bare pygrpc-native no-op and nodes on pygrpc-native")
    e2e = own_cost.measure([ROOT], args)
    own_cost.report(e2e, args)
    mode = hot_path.MODES["full"]
    with tempfile.TemporaryDirectory(prefix="fluxkv-bench-issue14-", dir=args.dir) as tmp:
        memory = hot_path.measure_memory(mode, args)
        replay = hot_path.measure_replay(mode, args, Path(tmp))

    rows: list[tuple[str, str, str, bool]] = []
    for method in own_cost.UNARY:
        if method in args.methods and UNARY_POLICY in args.aof:
            own = e2e[f"aof={UNARY_POLICY}"][method]["own_us"]
            figure = f"{statistics.median(own):.1f} µs own per call ({min(own):.1f}-{max(own):.1f} over the rounds)"
            rows.append((f"unary {method}", figure, f"≤ {TARGET_OWN_US:g} µs", statistics.median(own) <= TARGET_OWN_US))
    for method in own_cost.BATCH:
        if method not in args.methods:
            continue
        noop = statistics.median(e2e[own_cost.NOOP][method]["cpu_us"]) / args.items
        for policy in args.aof:
            cpu = [c / args.items for c in e2e[f"aof={policy}"][method]["cpu_us"]]
            figure = f"{statistics.median(cpu):.2f} µs per item ({min(cpu):.2f}-{max(cpu):.2f}; the no-op {noop:.2f})"
            target = f"≤ {hot_path.TARGET_ITEM_US:g} µs"
            rows.append((f"{method} aof={policy}", figure, target, statistics.median(cpu) <= hot_path.TARGET_ITEM_US))
    per_key, full_mib = memory["median_bytes_per_key"], memory["median_full_rss"] / hot_path.MIB
    exact = all(r["data_bytes"] == r["expected_bytes"] for r in memory["runs"])
    rows.append(("memory per key", f"{per_key:.0f} B", f"≤ {hot_path.TARGET_KEY_BYTES} B",
                 per_key <= hot_path.TARGET_KEY_BYTES))  # fmt: skip
    rows.append((f"RSS, {mode.keys:,} keys", f"{full_mib:.0f} MiB (Info's data_bytes {'exact' if exact else 'WRONG'})",
                 "≤ 250 MiB", full_mib <= 250 and exact))  # fmt: skip
    rate = replay["median_records_per_s"]
    rows.append(("replay", f"{rate:,.0f} records/s", f"≥ {hot_path.TARGET_REPLAY_PER_S:,}",
                 rate >= hot_path.TARGET_REPLAY_PER_S))  # fmt: skip

    loadavg_end = [round(x, 2) for x in os.getloadavg()]
    print(f"\n== issue 14's targets ({time.perf_counter() - started:.0f} s; load average at the start "
          f"{info['loadavg']}, at the end {loadavg_end})")  # fmt: skip
    width = max(len(r[0]) for r in rows)
    for name, figure, target, met in rows:
        print(f"{name:<{width}}  {figure:<62} target {target:<12} {'met' if met else 'MISSED'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            record: dict[str, Any] = {"bench": "issue14", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                      "machine": info, "loadavg_end": loadavg_end, "args": vars(args) | {"dir": None},
                                      "end_to_end": e2e, "memory": memory, "replay": replay,
                                      "targets": [dict(zip(("name", "figure", "target", "met"), r, strict=True))
                                                  for r in rows]}  # fmt: skip
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
