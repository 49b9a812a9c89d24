"""`fluxkv-server --workers N`: N worker processes on one host, each an
independent node (its own store, port and etcd registration), supervised by
the parent.

Worker i (0-based) listens on FLUX_SERVER_PORT + i and serves its admin HTTP
port on FLUX_ADMIN_PORT + i (with port 0, each picks a free port) and, when
FLUX_NODE_ID is set, has the id <FLUX_NODE_ID>-<i>. Every other setting is
the parent's: the parent hands its settings to each worker through the FLUX_*
environment. A worker that exits on its own is started again (after 1 s,
doubling up to 30 s with jitter while it keeps failing fast) and the parent logs it;
SIGTERM or SIGINT to the parent stops every worker gracefully (each one
deregisters, drains and flushes as a single node does), and so does the
parent's death by any signal (on Linux). With FLUX_AUTH_TOKENS_FILE, SIGHUP
to the parent goes on to every worker, each of which reloads the file. The
parent makes no gRPC call to its workers, so it needs no token of its own.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import time

from fluxkv import config
from fluxkv.core.backoff import Backoff, wait_or_stop

log = logging.getLogger("fluxkv.workers")

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
RESTART_MIN_S = 1.0
RESTART_MAX_S = 30.0
# A worker that ran this long before exiting is restarted after RESTART_MIN_S again.
_STABLE_S = 60.0


def worker_environment(settings: config.Settings, index: int) -> dict[str, str]:
    """The FLUX_* variables that make a worker process run worker `index`."""
    env = {s.env: s.as_variable(getattr(settings, s.field)) for s in config.SETTINGS}
    env["FLUX_WORKERS"] = "1"
    env["FLUX_SERVER_PORT"] = str(settings.port + index if settings.port else 0)
    if settings.admin_port is not None:
        env["FLUX_ADMIN_PORT"] = str(settings.admin_port + index if settings.admin_port else 0)
    if settings.node_id:
        env["FLUX_NODE_ID"] = f"{settings.node_id}-{index}"
    if settings.aof_filename:  # each worker is a node with data of its own
        env["FLUX_AOF_FILENAME"] = f"{settings.aof_filename}.{index}"
    return env


def _stop_with_parent() -> None:
    """In a new worker, before it runs: have the kernel send it SIGTERM when the
    parent dies, even by SIGKILL, so that no worker outlives its supervisor
    (and stays registered with nobody to stop it). Linux only; elsewhere the
    workers outlive a parent killed without warning."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class _Worker:
    def __init__(self, index: int, env: dict[str, str]) -> None:
        self.index = index
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.started = 0.0
        # Restart delays: they grow while it exits within _STABLE_S of each start.
        self.restarts = Backoff(RESTART_MIN_S, RESTART_MAX_S)

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fluxkv.server",
            env={**os.environ, **self.env},
            stdin=asyncio.subprocess.DEVNULL,
            preexec_fn=_stop_with_parent,
        )
        self.started = time.monotonic()
        log.info(
            "worker %d started (pid %d)",
            self.index,
            self.proc.pid,
            extra={"event": "worker_started", "worker": self.index},
        )


async def supervise(settings: config.Settings) -> int:
    """Run settings.workers workers until SIGTERM or SIGINT; return the exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    workers = [_Worker(i, worker_environment(settings, i)) for i in range(settings.workers)]
    if settings.auth_tokens_file:  # each worker reloads its tokens itself
        loop.add_signal_handler(signal.SIGHUP, _pass_on, workers, signal.SIGHUP)
    for w in workers:
        await w.start()
    log.info("supervising %d workers", len(workers), extra={"event": "supervising"})
    keepers = [asyncio.create_task(_keep_running(w, stop)) for w in workers]
    await stop.wait()
    log.info("stopping %d workers", len(workers), extra={"event": "workers_stopping"})
    for w in workers:
        if w.proc is not None and w.proc.returncode is None:
            w.proc.send_signal(signal.SIGTERM)
    codes = await asyncio.gather(*keepers)
    log.info("every worker stopped", extra={"event": "workers_stopped"})
    # -SIGTERM: a worker still starting (no handler yet, nothing served) ended by our signal.
    return 0 if all(code in (0, -signal.SIGTERM) for code in codes) else 1


def _pass_on(workers: list[_Worker], sig: signal.Signals) -> None:
    log.info("passing %s on to %d workers", sig.name, len(workers), extra={"event": "signal", "signal": sig.name})
    for w in workers:
        if w.proc is not None and w.proc.returncode is None:
            w.proc.send_signal(sig)


async def _keep_running(worker: _Worker, stop: asyncio.Event) -> int:
    """Wait for the worker to exit; start it again unless we are stopping.
    Returns its last exit status."""
    while True:
        assert worker.proc is not None
        code = await worker.proc.wait()
        if stop.is_set():
            return code
        if time.monotonic() - worker.started >= _STABLE_S:
            worker.restarts.reset()
        delay = worker.restarts.next_delay()
        log.warning("worker %d (pid %d) exited with status %d; starting it again in %.0f s",
                    worker.index, worker.proc.pid, code, delay,
                    extra={"event": "worker_exited", "worker": worker.index})  # fmt: skip
        if await wait_or_stop(delay, stop):
            return code
        await worker.start()
