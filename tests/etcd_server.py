"""A private single-member etcd for tests that stop, kill or restart it.

Each one has its own name, cluster token, client and peer ports and data directory (in a temporary directory), so
tests never share state. Its election timeout is short (500 ms): etcd raises a lease TTL below 1.5 election timeouts
to that minimum, and this keeps it at 1 s, so lease-expiry tests can use a 1 s TTL.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest

from .private_server import PrivateServer
from .rabbitmq_broker import free_port

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.02
LOG_TAIL_LINES = 40

_numbers = itertools.count(1)
# /health is on loopback: a proxy from the environment must not be asked for it.
_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EtcdServerError(RuntimeError):
    """The private etcd failed to start or to stop."""


class EtcdServer(PrivateServer):
    """A single-member etcd cluster on 127.0.0.1, started by start() and gone after close().

    The ports and the data directory stay the same across stop()/kill() and start(), so keys and leases survive a
    restart. The methods block; start() takes 0.1 to 0.5 s, a restart on existing data about 1 s.
    """

    def __init__(self, start_timeout: float = START_TIMEOUT_S) -> None:
        self.name = f"fluxkvtest-{os.getpid()}-{next(_numbers)}"
        super().__init__(f"etcd {self.name}", EtcdServerError)
        self.start_timeout = start_timeout
        self.data_dir = self.base_dir / "data"  # etcd's keys, leases and WAL; delete it while stopped to lose them
        self.client_port = free_port()
        self.peer_port = free_port()
        while self.peer_port == self.client_port:
            self.peer_port = free_port()
        self._log = self.base_dir / "etcd.log"

    @property
    def endpoint(self) -> str:
        """Where clients connect, as host:port; the same for the server's whole life."""
        return f"{HOST}:{self.client_port}"

    @property
    def pid(self) -> int | None:
        """The etcd process's pid, or None when it is not running."""
        return None if self._proc is None else self._proc.pid

    def start(self) -> None:
        """Start etcd (on the data of an earlier run, if any); returns once /health reports it healthy."""
        if self._proc is not None:
            raise EtcdServerError(f"etcd {self.name} is already running")
        etcd = shutil.which("etcd")
        if etcd is None:
            raise EtcdServerError(
                "etcd is not on PATH: install it with `apt-get install etcd-server` (tests/run.sh does)"
            )
        client_url = f"http://{self.endpoint}"
        peer_url = f"http://{HOST}:{self.peer_port}"
        args = [
            etcd,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster={self.name}={peer_url}",
            f"--initial-cluster-token={self.name}",
            "--heartbeat-interval=50",
            "--election-timeout=500",
            "--logger=zap",
            "--log-outputs=stderr",
        ]
        deadline = time.monotonic() + self.start_timeout
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                args,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C goes to pytest only, which then kills it
            )
        try:
            self._wait_healthy(deadline)
        except BaseException:
            self.kill()
            raise

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM: etcd shuts down gracefully, keeping its data for the next start()."""
        proc = self._running_process()
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self._error(f"did not shut down within {timeout} s; killed it") from None
        self._proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would end it; start() brings it back."""
        proc = self._running_process()
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
        self._proc = None

    def _wait_healthy(self, deadline: float) -> None:
        """Poll /health, which answers true once the member has a leader and serves reads."""
        proc = self._running_process()
        while True:
            if proc.poll() is not None:
                raise self._error(f"exited with status {proc.returncode} while starting")
            try:
                with _no_proxy.open(f"http://{self.endpoint}/health", timeout=1) as answer:
                    if json.load(answer).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass  # not listening yet, or not healthy yet (503)
            if time.monotonic() > deadline:
                raise self._error(f"was not healthy within {self.start_timeout} s")
            time.sleep(POLL_INTERVAL_S)

    def _error(self, message: str) -> EtcdServerError:
        lines = self._log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        return EtcdServerError(f"etcd {self.name} {message}\n--- last lines of {self._log} ---\n" + "\n".join(lines))


@pytest.fixture
def etcd_server() -> Iterator[EtcdServer]:
    """A started private etcd, killed and deleted after the test."""
    with EtcdServer() as server:
        yield server
