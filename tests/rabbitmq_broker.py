"""A private RabbitMQ node for tests that stop, kill or restart a broker.

The system broker (rabbit@localhost on 127.0.0.1:5672) is shared by other tests, so such tests get a node of
their own instead: its own node name, Erlang cookie, ports, configuration, data and logs, all in a temporary
directory. Nothing of /etc/rabbitmq applies to it, and it enables no plugins (so no fixed ports like 15672).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .private_server import PrivateServer

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # the real scripts; /usr/sbin/rabbitmq-server would `su rabbitmq`
HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.05
LOG_TAIL_LINES = 60
CLI_DIST_PORTS = range(35672, 35683)  # where any rabbitmqctl run listens for a moment (its Erlang distribution)

_node_numbers = itertools.count(1)


class RabbitBrokerError(RuntimeError):
    """The private node failed to start or to stop."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and not one rabbitmqctl uses; another process may still take it."""
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port: int = sock.getsockname()[1]
        if port not in CLI_DIST_PORTS:
            return port


class RabbitBroker(PrivateServer):
    """A private RabbitMQ node on 127.0.0.1, started by start() and gone after close().

    The node name, data directory and AMQP port stay the same across stop()/kill() and start(), so durable
    queues and persistent messages survive a restart. The methods block; async tests can run the slow ones
    (start, restart) with asyncio.to_thread.
    """

    def __init__(self, start_timeout: float = START_TIMEOUT_S) -> None:
        self.node = f"fluxkvtest-{os.getpid()}-{next(_node_numbers)}@localhost"
        super().__init__(self.node, RabbitBrokerError)
        self.start_timeout = start_timeout
        self._port = free_port()
        self._pid: int | None = None
        self._output = self.base_dir / "output.log"  # the node's console: boot errors and its log
        self._pid_file = self.base_dir / "node.pid"
        self._env = self._configure()

    @property
    def port(self) -> int:
        """The AMQP port; the same for the broker's whole life."""
        return self._port

    @property
    def url(self) -> str:
        """Where the default user guest logs in (it may, over loopback)."""
        return f"amqp://guest:guest@{HOST}:{self._port}/"

    @property
    def pid(self) -> int | None:
        """The OS pid of the node's Erlang VM (beam.smp), or None when it is not running."""
        return self._pid

    def _configure(self) -> dict[str, str]:
        """Write the node's cookie and configuration files; returns the environment for its scripts and rabbitmqctl."""
        home = self.base_dir / "home"
        home.mkdir()
        cookie = home / ".erlang.cookie"  # read by the node and by rabbitmqctl through HOME
        cookie.write_text(os.urandom(16).hex())
        cookie.chmod(0o400)
        (self.base_dir / "rabbitmq-env.conf").write_text(
            "# Empty on purpose: replaces /etc/rabbitmq/rabbitmq-env.conf, which names the system node.\n"
        )
        (self.base_dir / "rabbitmq.conf").write_text(f"listeners.tcp.local = {HOST}:{self._port}\n")
        (self.base_dir / "enabled_plugins").write_text("[].\n")
        # Inherited RABBITMQ_* or ERL_* settings could point the node or the CLI elsewhere.
        env = {name: value for name, value in os.environ.items() if not name.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(home),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_CONF_ENV_FILE=str(self.base_dir / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(self.base_dir / "rabbitmq.conf"),
            RABBITMQ_CONFIG_FILES=str(self.base_dir / "conf.d"),  # does not exist: no /etc/rabbitmq/conf.d
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.base_dir / "advanced.config"),  # does not exist either
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base_dir / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(self.base_dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base_dir / "log"),
            RABBITMQ_PID_FILE=str(self._pid_file),
            # Like the system node: Erlang distribution (and epmd, if this node has to start it) on loopback only.
            ERL_EPMD_ADDRESS=HOST,
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def start(self) -> None:
        """Boot the node; returns once it has fully started and its AMQP port accepts connections."""
        if self._proc is not None:
            raise RabbitBrokerError(f"{self.node} is already running")
        deadline = time.monotonic() + self.start_timeout
        with socket.socket() as amqp:  # held while the inter-node port is chosen, so that the two differ
            amqp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the broker's: TIME_WAIT does not count
            try:
                amqp.bind((HOST, self._port))
            except OSError:
                raise RabbitBrokerError(f"{self.node}: its AMQP port {self._port} is taken") from None
            # The inter-node port need not stay the same, so a fresh one spares restart() a port clash.
            dist_port = free_port()
        self._pid_file.unlink(missing_ok=True)
        with self._output.open("ab") as output:
            self._proc = subprocess.Popen(
                [str(RABBITMQ_BIN / "rabbitmq-server")],
                env={**self._env, "RABBITMQ_DIST_PORT": str(dist_port)},
                cwd=self.base_dir,  # where an erl_crash.dump would go
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a process group of its own, to kill all of it at once
            )
        try:
            self._wait_for_amqp_port(deadline)
            remaining = max(1, round(deadline - time.monotonic()))
            self._rabbitmqctl("await_startup", "--timeout", str(remaining), timeout=remaining + 10)
            self._pid = self._read_pid()
        except BaseException:
            self._kill_group()
            raise

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Shut the node down gracefully, keeping its data for the next start()."""
        proc = self._running_process()
        proc.terminate()  # the rabbitmq-server script turns SIGTERM into a clean shutdown of the node
        self._wait_for_exit(proc, timeout, "did not shut down")

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM, as a crash would end it; start() brings it back."""
        proc = self._running_process()
        assert self._pid is not None  # known from start() on
        if proc.poll() is None:  # else the VM has ended already, and its pid may be another process's by now
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
        self._wait_for_exit(proc, STOP_TIMEOUT_S, "did not end after SIGKILL of its VM")

    def restart(self) -> None:
        """stop() then start(): same node name, data and AMQP port."""
        self.stop()
        self.start()

    def _wait_for_amqp_port(self, deadline: float) -> None:
        proc = self._running_process()
        while True:
            if proc.poll() is not None:
                raise self._error(f"exited with status {proc.returncode} while starting")
            try:
                socket.create_connection((HOST, self._port), timeout=1).close()
            except OSError:
                pass
            else:
                return
            if time.monotonic() > deadline:
                raise self._error(f"did not open its AMQP port within {self.start_timeout} s")
            time.sleep(POLL_INTERVAL_S)

    def _rabbitmqctl(self, *args: str, timeout: float) -> None:
        try:
            done = subprocess.run(
                [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", self.node, *args],
                env=self._env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise self._error(f"rabbitmqctl {' '.join(args)} did not finish within {timeout} s") from None
        if done.returncode != 0:
            raise self._error(f"rabbitmqctl {' '.join(args)} failed:\n{done.stdout}{done.stderr}")

    def _read_pid(self) -> int:
        """The VM's pid from the node's pid file, checked to belong to the process group we started."""
        pid = int(self._pid_file.read_text())
        if os.getpgid(pid) != self._running_process().pid:
            raise self._error(f"pid {pid} in {self._pid_file} is not a process of this node")
        return pid

    def _wait_for_exit(self, proc: subprocess.Popen[bytes], timeout: float, failure: str) -> None:
        """Wait for the rabbitmq-server script, which exits once the VM has."""
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill_group()
            raise self._error(f"{failure} within {timeout} s; killed it") from None
        self._proc = self._pid = None

    def _kill_group(self) -> None:
        """SIGKILL the script, the VM and its helper processes at once, then reap the script."""
        proc = self._running_process()
        self._proc = self._pid = None
        if proc.returncode is None:  # not reaped yet, so its pid still names our process group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def _error(self, message: str) -> RabbitBrokerError:
        lines = self._output.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        return RabbitBrokerError(f"{self.node} {message}\n--- last lines of {self._output} ---\n" + "\n".join(lines))


@pytest.fixture
def rabbit_broker() -> Iterator[RabbitBroker]:
    """A started private broker, killed and deleted after the test."""
    with RabbitBroker() as broker:
        yield broker
