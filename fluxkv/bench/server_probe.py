"""What fluxkv-bench observes of the server process (--server-pid): its CPU time
from /proc, and (--profile) py-spy profiles of it during the measured phase."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROFILE_FILES = {"speedscope": "server.speedscope.json", "flamegraph": "server-flamegraph.svg"}
PY_SPY_ATTACH_S = 0.5  # py-spy that cannot attach exits within this
PY_SPY_STOP_TIMEOUT_S = 60.0


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (the workers of `fluxkv-server --workers N`), from /proc/PID/task/*/children."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*/children"):
            try:
                pending.extend(int(child) for child in task.read_text().split())
            except OSError:  # the task ended meanwhile
                continue
    return found


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of `pid` and its descendants, the children they
    have reaped included (so a worker that ended during the run still counts)."""
    ticks = 0
    for process in process_tree(pid):
        try:
            stat = Path(f"/proc/{process}/stat").read_text()
        except OSError:  # it ended meanwhile: its time is in its parent's cutime from now on
            continue
        fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3 (state)
        ticks += sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / CLK_TCK


def find_py_spy() -> str | None:
    """py-spy next to this Python (a virtualenv's bin), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


class ProfileError(Exception):
    """py-spy could not profile the server."""


class Profiler:
    """Two `py-spy record` runs at once on the server and its subprocesses: one
    writes a speedscope profile, the other a flame-graph SVG. py-spy writes one
    format per run and cannot convert its output afterwards, so two runs over the
    same interval give both; with --nonblocking neither pauses the server to
    sample it, so profiling twice costs the server little."""

    def __init__(self, py_spy: str, pid: int, directory: Path) -> None:
        self._py_spy, self._pid, self._dir = py_spy, pid, directory
        self._runs: list[tuple[subprocess.Popen[bytes], Path, Path]] = []

    def start(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        for fmt, name in PROFILE_FILES.items():
            output, log = self._dir / name, self._dir / f"py-spy-{fmt}.log"
            argv = [self._py_spy, "record", "--pid", str(self._pid), "--subprocesses", "--nonblocking"]
            with log.open("wb") as log_file:
                proc = subprocess.Popen(
                    [*argv, "--format", fmt, "--output", str(output)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # Ctrl-C reaches us, and we stop py-spy when we are ready
                )
            self._runs.append((proc, output, log))
        time.sleep(PY_SPY_ATTACH_S)
        for proc, _, log in self._runs:
            if proc.poll() is not None:
                self.stop()
                raise ProfileError(f"py-spy could not profile pid {self._pid}: {_tail(log)}")

    def stop(self) -> list[Path]:
        """Stop both runs (py-spy writes its output on SIGINT); the files written."""
        written = []
        for proc, output, log in self._runs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(PY_SPY_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if output.exists():
                written.append(output)
                log.unlink(missing_ok=True)
        self._runs.clear()
        return written


def _tail(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines()
    return lines[-1] if lines else "(no output)"
