"""`fluxkv-bench`: load-test FluxKV nodes (or etcd, as a reference) over gRPC.

It sends a workload of Set, Get, mixed, MultiSet or MultiGet calls on keys drawn
uniformly from a key space, closed loop (-c in flight) or open loop (--rate,
latency from each request's due time), from one or more client processes, then
prints a summary of successes, failures by status code, throughput of the
successful requests, latency percentiles from a histogram, and client and
server CPU per request; --json and --history write it as JSON (the schema is in
bench/README.md). The modules behind it: bench_load (requests, routing and
drivers), bench_hist (the histogram), bench_server (server CPU, py-spy) and
bench_report (progress, summary, JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fluxkv import arguments
from fluxkv.bench.load import (
    BATCH_WORKLOADS,
    ENGINES,
    PRELOADED_WORKLOADS,
    WORKLOADS,
    KeySpace,
    Outcome,
    Plan,
    SetupError,
    Tally,
    connections,
    merge,
    preload,
    probe,
    probe_request,
    run_on_loop,
    run_process,
    until_stopped,
)
from fluxkv.bench.report import Progress, Result, machine, summary, to_json
from fluxkv.bench.server_probe import ProfileError, Profiler, cpu_seconds, find_py_spy
from fluxkv.config import ConfigError, Settings, load_etcd_access
from fluxkv.security import tls
from fluxkv.version import __version__

DEFAULT_ADDR = "localhost:50052"
DEFAULT_REQUESTS = 100_000
DEFAULT_READ_RATIO = 0.5
DEFAULT_BATCH = 10
MAX_BATCH = 1000  # the node's default FLUX_MAX_BATCH_ITEMS
SETUP_TIMEOUT_S = 600.0  # a client process that is not ready by then is given up

SUCCESS, USAGE, FAILURE, INTERRUPTED = 0, 2, 3, 130

EPILOG = """\
examples:
  fluxkv-bench -c 100 -n 500000                      closed loop, 100 in flight
  fluxkv-bench -t get --rate 5000 --duration 30      open loop, 5000 requests/s for 30 s
  fluxkv-bench -t mset -P 100 --processes 2 --conns 2
  fluxkv-bench --server-pid PID --profile prof/      server CPU per request, py-spy profiles

exit status:
  0    the run completed (failed requests are in the summary and the JSON, not the status)
  2    bad usage
  3    a node or etcd cannot be reached, the preload failed, or py-spy cannot profile the server
  130  interrupted (Ctrl-C): the partial summary is printed and written
"""


def main(argv: Sequence[str] | None = None) -> None:
    try:
        sys.exit(run(argv))
    except KeyboardInterrupt:  # before the load's own handler is in place
        sys.exit(INTERRUPTED)


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        nodes = [args.addr[0]] if args.target == "etcd" else _nodes(args)
        plan = _plan(args, nodes)
        watch = ServerWatch(args.server_pid, args.profile)
        progress = Progress(plan.requests, plan.duration_s)
        run_load = _run_single if args.processes == 1 else _run_processes
        outcomes, wall_s, interrupted = run_load(plan, args, watch, progress)
    except (SetupError, ProfileError) as exc:
        print(f"fluxkv-bench: {exc}", file=sys.stderr)
        return FAILURE
    outcome = merge(outcomes)
    result = Result(
        started=started,
        hist=outcome.hist,
        failures=outcome.failures,
        duration_s=wall_s,
        items_per_call=plan.batch,
        client_cpu_s=outcome.cpu_s,
        client_busiest=max((share for o in outcomes if (share := o.core_share()) is not None), default=None),
        server_cpu_s=watch.server_cpu_s,
        interrupted=interrupted,
    )
    # The flags as given, but never the token (only whether one was sent) nor etcd's credentials.
    flags = {name: value for name, value in vars(args).items() if name not in ("client_tls", "etcd_access")}
    flags["token"] = bool(args.token)
    record = to_json(result, flags, nodes, machine())
    print(summary(record), flush=True)
    for path in watch.profiles:
        print(f"  profile: {path}")
    try:
        if args.json:
            Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        if args.history:
            with open(args.history, "a") as f:
                f.write(json.dumps(record) + "\n")
    except OSError as exc:
        print(f"fluxkv-bench: cannot write the result: {exc}", file=sys.stderr)
        return FAILURE
    return INTERRUPTED if interrupted else SUCCESS


# -- running the load -------------------------------------------------------------


class ServerWatch:
    """The server's side of the measured phase: its CPU time and, with --profile, py-spy."""

    def __init__(self, pid: int | None, profile: str | None) -> None:
        self._pid = pid
        py_spy = find_py_spy()
        self._profiler = Profiler(py_spy, pid, Path(profile)) if profile and py_spy and pid else None
        self._cpu0 = 0.0
        self.server_cpu_s: float | None = None
        self.profiles: list[Path] = []

    def begin(self) -> None:
        if self._profiler:
            self._profiler.start()
        if self._pid:
            self._cpu0 = cpu_seconds(self._pid)

    def end(self) -> None:
        if self._pid:
            self.server_cpu_s = cpu_seconds(self._pid) - self._cpu0
        if self._profiler:
            self.profiles = self._profiler.stop()


async def _prepare(plan: Plan, no_preload: bool, stopped: asyncio.Event) -> bool:
    """Check that every node answers (SetupError otherwise), then preload the key
    space when the workload reads; False if interrupted meanwhile."""
    conns = connections(plan, 1)
    try:
        await probe(conns, *probe_request(plan))
        if no_preload or plan.workload not in PRELOADED_WORKLOADS:
            return True
        print(f"fluxkv-bench: preloading {plan.keyspace} keys", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        calls: list[int] = []

        async def load() -> None:
            calls.append(await preload(plan, KeySpace(plan), conns))

        if not await until_stopped(load(), stopped):
            return False
        print(f"fluxkv-bench: preloaded in {calls[0]} calls, {time.monotonic() - t0:.1f} s", file=sys.stderr)
        return True
    finally:
        await conns.close()


async def _report_progress(progress: Progress, counts: Callable[[], tuple[int, int]]) -> None:
    while True:
        await asyncio.sleep(progress.interval_s)
        progress.update(*counts())


def _run_single(
    plan: Plan, args: argparse.Namespace, watch: ServerWatch, progress: Progress
) -> tuple[list[Outcome], float, bool]:
    """The load from this process; ([outcome], measured seconds, interrupted)."""

    async def go() -> tuple[Outcome, bool]:
        stopped = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stopped.set)
        tally = Tally()
        if not await _prepare(plan, args.no_preload, stopped):
            return Outcome(tally.hist, tally.failures, 0.0, 0.0), True
        reporter: list[asyncio.Task[None]] = []

        async def begin() -> None:
            watch.begin()
            progress.begin()
            reporter.append(asyncio.create_task(_report_progress(progress, lambda: (tally.done, tally.failed()))))

        try:
            outcome = await run_process(plan, tally, begin, stopped)
        finally:
            if reporter:  # the measured phase began
                reporter[0].cancel()
                watch.end()
                progress.update(tally.done, tally.failed())
                progress.finish()
        return outcome, stopped.is_set()

    outcome, interrupted = run_on_loop(plan, go())
    return [outcome], outcome.duration_s, interrupted


def _run_processes(
    plan: Plan, args: argparse.Namespace, watch: ServerWatch, progress: Progress
) -> tuple[list[Outcome], float, bool]:
    """The load from --processes client processes (spawned: grpc does not survive
    fork), which warm up, wait for a common start, and send their results back;
    (their outcomes, measured seconds, interrupted)."""
    stop_prepare = asyncio.Event()

    async def prepare() -> bool:
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop_prepare.set)
        return await _prepare(plan, args.no_preload, stop_prepare)

    if not run_on_loop(plan, prepare()):
        return [], 0.0, True
    n = args.processes
    ctx = multiprocessing.get_context("spawn")
    start, events, counts = ctx.Event(), ctx.Queue(), ctx.Array("q", 2 * n, lock=False)
    children = [
        ctx.Process(target=_child, args=(plan.share(i, n), i, start, events, counts), daemon=True) for i in range(n)
    ]
    interrupted = False

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        for child in children:
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signal.SIGINT)
        start.set()

    previous = signal.signal(signal.SIGINT, on_sigint)
    ready: set[int] = set()
    results: dict[int, Outcome] = {}
    began = 0.0
    try:
        for child in children:
            child.start()
        deadline = time.monotonic() + SETUP_TIMEOUT_S
        while len(results) < n:
            if not began and len(ready | results.keys()) == n:
                watch.begin()
                progress.begin()
                began = time.monotonic()
                start.set()
            try:
                kind, index, body = events.get(timeout=progress.interval_s)
            except queue.Empty:
                kind = ""
            if kind == "error":
                raise SetupError(body)
            if kind == "ready":
                ready.add(index)
            elif kind == "result":
                results[index] = Outcome.from_dict(body)
            elif began:
                progress.update(sum(counts[0::2]), sum(counts[1::2]))
            for i, child in enumerate(children):
                if i not in results and child.exitcode is not None and events.empty():
                    raise SetupError(f"client process {i} exited with status {child.exitcode}")
            if not began and time.monotonic() > deadline:
                raise SetupError(f"the client processes were not ready within {SETUP_TIMEOUT_S:g} s")
        wall = time.monotonic() - began if began else 0.0
    finally:
        signal.signal(signal.SIGINT, previous)
        if began:
            watch.end()
        for child in children:
            if child.is_alive() and child.pid is not None:
                child.terminate()
            child.join()
    if began:
        progress.update(sum(counts[0::2]), sum(counts[1::2]))
        progress.finish()
    return list(results.values()), wall, interrupted


def _child(plan: Plan, index: int, start: Any, events: Any, counts: Any) -> None:
    """A client process: events gets ("ready", i, None) before the measured phase,
    then ("result", i, outcome) or ("error", i, message); counts[2i:2i+2] follow
    its done and failed requests."""

    async def go() -> None:
        stopped = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stopped.set)
        tally = Tally()
        publisher: list[asyncio.Task[None]] = []

        async def publish() -> None:
            while True:
                counts[2 * index], counts[2 * index + 1] = tally.done, tally.failed()
                await asyncio.sleep(0.1)

        async def begin() -> None:
            events.put(("ready", index, None))
            await asyncio.to_thread(start.wait, SETUP_TIMEOUT_S)
            publisher.append(asyncio.create_task(publish()))

        try:
            outcome = await run_process(plan, tally, begin, stopped)
        except SetupError as exc:
            events.put(("error", index, str(exc)))
            return
        counts[2 * index], counts[2 * index + 1] = tally.done, tally.failed()
        events.put(("result", index, outcome.to_dict()))

    run_on_loop(plan, go())


# -- arguments ----------------------------------------------------------------------


def _nodes(args: argparse.Namespace) -> list[str]:
    """The nodes to load: --addr, or those registered in etcd (--etcd)."""
    if not args.etcd:
        return sorted(set(args.addr))
    from fluxkv.cluster.discovery import EtcdNodes
    from fluxkv.cluster.etcd_client import EtcdError
    from fluxkv.security.tls import etcd_tls

    access: Settings = args.etcd_access

    async def read() -> list[str]:
        async with EtcdNodes(
            args.etcd,
            args.etcd_prefix,
            args.timeout,
            tls=etcd_tls(access),
            username=access.etcd_username,
            password=access.etcd_password,
        ) as source:
            return sorted(source.addresses)

    try:
        nodes = asyncio.run(read())
    except (EtcdError, ValueError) as exc:
        raise SetupError(f"cannot reach etcd {','.join(args.etcd)} ({exc})") from None
    if not nodes:
        raise SetupError(f"no node is registered under {args.etcd_prefix} in etcd {','.join(args.etcd)}")
    return nodes


def _plan(args: argparse.Namespace, nodes: list[str]) -> Plan:
    return Plan(
        target=args.target,
        engine=args.engine,
        workload=args.workload,
        nodes=tuple(nodes),
        keyspace=args.keyspace,
        value_size=args.value_size,
        batch=args.batch or 1,
        read_ratio=args.read_ratio if args.read_ratio is not None else 0.0,
        seed=args.seed,
        vnodes=args.vnodes,
        conns=args.conns,
        concurrency=args.concurrency,
        requests=args.requests,
        duration_s=args.duration,
        rate=args.rate,
        warmup=args.warmup,
        timeout_s=args.timeout,
        tls=args.client_tls,
        token=args.token or "",
    )


def _ratio(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= number <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text!r}")
    return number


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fluxkv-bench",
        description="Load-test FluxKV nodes over gRPC and report throughput, latency percentiles and CPU per request.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"fluxkv-bench {__version__}")
    load = p.add_argument_group("load")
    load.add_argument(
        "-c",
        "--concurrency",
        type=arguments.integer(1),
        default=100,
        metavar="N",
        help="requests in flight, over all channels and processes (default 100); with --rate, the most in flight",
    )
    amount = load.add_mutually_exclusive_group()
    amount.add_argument(
        "-n",
        "--requests",
        type=arguments.integer(1),
        metavar="N",
        help=f"measured requests (default {DEFAULT_REQUESTS})",
    )
    amount.add_argument(
        "--duration", type=arguments.positive, metavar="SECONDS", help="measure for this long instead of -n"
    )
    load.add_argument(
        "--rate",
        type=arguments.positive,
        metavar="N",
        help="open loop: send N requests per second in all, each latency measured from the "
        "request's due time (default: closed loop)",
    )
    load.add_argument(
        "--conns",
        type=arguments.integer(1),
        default=1,
        metavar="N",
        help="gRPC channels (connections) to each node, per process (default 1)",
    )
    load.add_argument(
        "--processes",
        type=arguments.integer(1),
        default=1,
        metavar="N",
        help="client processes sharing -c, -n, --warmup and --rate (default 1)",
    )
    load.add_argument(
        "--engine",
        choices=ENGINES,
        default=ENGINES[0],
        help="the gRPC client: lean, HTTP/2 connections of fluxkv-bench's own that cost a small part of the "
        "server's CPU per call (default), or grpcio, grpc.aio channels, the reference",
    )
    load.add_argument(
        "--warmup",
        type=arguments.integer(0),
        default=1000,
        metavar="N",
        help="unmeasured requests before the measured ones (default 1000)",
    )
    load.add_argument(
        "--timeout",
        type=arguments.positive,
        default=10.0,
        metavar="SECONDS",
        help="deadline of each call (default 10); a call past it fails with DEADLINE_EXCEEDED",
    )
    work = p.add_argument_group("workload")
    work.add_argument("-t", "--workload", choices=WORKLOADS, default="set", help="the calls to send (default set)")
    work.add_argument(
        "--read-ratio",
        type=_ratio,
        metavar="F",
        help=f"mixed: the share of gets, the rest sets (default {DEFAULT_READ_RATIO})",
    )
    work.add_argument(
        "-P",
        "--batch",
        type=arguments.integer(1, MAX_BATCH),
        metavar="N",
        help=f"mset, mget: keys per call (default {DEFAULT_BATCH})",
    )
    work.add_argument(
        "-d",
        "--value-size",
        type=arguments.integer(0, 64 * 1024 * 1024),
        default=100,
        metavar="BYTES",
        help="value size (default 100)",
    )
    work.add_argument(
        "-r",
        "--keyspace",
        type=arguments.integer(1),
        default=100_000,
        metavar="N",
        help="distinct keys, drawn uniformly at random (default 100000)",
    )
    work.add_argument("--seed", type=int, default=1, metavar="N", help="seed of the key draws and values (default 1)")
    work.add_argument(
        "--no-preload",
        action="store_true",
        help="get, mget, mixed: do not write every key (with MultiSet) before the run",
    )
    where = p.add_argument_group("servers")
    nodes = where.add_mutually_exclusive_group()
    nodes.add_argument(
        "--addr",
        type=arguments.endpoints,
        action="append",
        metavar="HOST:PORT",
        help=f"a node; repeat or separate with commas to route over several by the ring (default {DEFAULT_ADDR})",
    )
    nodes.add_argument(
        "--etcd",
        type=arguments.endpoints,
        metavar="HOST:PORT[,...]",
        help="find the nodes in etcd and route by the ring; TLS and auth to etcd as the nodes' FLUX_ETCD_CA_FILE, "
        "_CERT_FILE, _KEY_FILE, _USERNAME and _PASSWORD",
    )
    where.add_argument(
        "--etcd-prefix",
        default=Settings.etcd_prefix,
        metavar="PREFIX",
        help=f"the nodes' registration prefix (default {Settings.etcd_prefix})",
    )
    where.add_argument(
        "--vnodes",
        type=arguments.integer(1, 4096),
        default=Settings.ring_vnodes,
        metavar="N",
        help=f"the ring's points per node, as the nodes' FLUX_RING_VNODES (default {Settings.ring_vnodes})",
    )
    tls.add_client_arguments(where)
    where.add_argument(
        "--target",
        choices=("fluxkv", "etcd"),
        default="fluxkv",
        help="etcd: send -t set/get as etcd's KV Put/Range to the etcd at --addr, as a reference "
        "for the benchmark suite (default fluxkv)",
    )
    out = p.add_argument_group("output")
    out.add_argument(
        "--server-pid",
        type=arguments.integer(1),
        metavar="PID",
        help="report the server's CPU per request (this process and its children)",
    )
    out.add_argument(
        "--profile",
        metavar="DIR",
        help="record the server with py-spy during the measured phase (needs --server-pid): "
        "DIR/server.speedscope.json and DIR/server-flamegraph.svg",
    )
    out.add_argument("--json", metavar="FILE", help="write the result as JSON (schema: bench/README.md)")
    out.add_argument("--history", metavar="FILE", help="append the result to FILE as one JSON line")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The arguments, checked together and with their defaults resolved; exits 2 on bad usage."""
    parser = _parser()
    args = parser.parse_args(argv)
    args.addr = [a for group in args.addr for a in group] if args.addr else [DEFAULT_ADDR]
    if args.requests is None and args.duration is None:
        args.requests = DEFAULT_REQUESTS
    if args.batch is not None and args.workload not in BATCH_WORKLOADS:
        parser.error(f"-P/--batch applies to -t mset and mget, not -t {args.workload}")
    if args.workload in BATCH_WORKLOADS and args.batch is None:
        args.batch = DEFAULT_BATCH
    if args.read_ratio is not None and args.workload != "mixed":
        parser.error(f"--read-ratio applies to -t mixed, not -t {args.workload}")
    if args.workload == "mixed" and args.read_ratio is None:
        args.read_ratio = DEFAULT_READ_RATIO
    if args.target == "etcd":
        if args.workload not in ("set", "get"):
            parser.error(f"--target etcd sends -t set or get (as Put and Range), not -t {args.workload}")
        if args.etcd or len(args.addr) != 1:
            parser.error("--target etcd needs exactly one --addr: the etcd endpoint to load")
    args.etcd_access = None
    if args.etcd:
        try:
            args.etcd_access = load_etcd_access(os.environ)
        except ConfigError as exc:
            parser.error(str(exc))
    if args.concurrency < args.conns * args.processes:
        parser.error(
            f"-c {args.concurrency} is below --conns x --processes ({args.conns * args.processes}): "
            "every channel needs a request in flight"
        )
    if args.server_pid is not None and not os.path.exists(f"/proc/{args.server_pid}"):
        parser.error(f"--server-pid {args.server_pid}: no such process")
    if args.profile:
        if args.server_pid is None:
            parser.error("--profile needs --server-pid: the server process to profile")
        if find_py_spy() is None:
            parser.error("--profile needs py-spy, which is not installed: pip install 'fluxkv[profile]'")
    args.client_tls = tls.client_tls(args, parser)
    return args
