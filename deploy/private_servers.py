"""Private etcd and RabbitMQ servers from Debian's packages (etcd-server, rabbitmq-server), for tests and for
deploy/native_stack.py.

Each one has its own name, ports and files in a directory of its own, so it never shares state with another one or
with the system's services, and nothing of /etc applies to it. start() blocks until the server serves; close()
kills it (and what it started) and deletes its files, and runs at interpreter exit for a server still open. A
start() that fails, or that a signal handler interrupts by raising, kills the server it was starting.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
RABBITMQ_START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
LOG_TAIL_LINES = 60
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")  # the real scripts; /usr/sbin/rabbitmq-server would `su rabbitmq`
CLI_DIST_PORTS = range(35672, 35683)  # where any rabbitmqctl run listens for a moment (its Erlang distribution)

_numbers = itertools.count(1)
# etcd's /health is on loopback: a proxy from the environment must not be asked for it.
_no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# Ports handed out for a server to bind later come from below the kernel's ephemeral range: one taken from that
# range (bind to port 0, then release it) can be given to any outgoing connection before its server binds it, as
# a node's admin port once was in a CI run of the native stack ("address already in use").
RESERVED_PORTS_FROM = 10_000
_port_draws = random.SystemRandom()  # not the random module's state, which tests may seed


def ephemeral_ports_from() -> int:
    """The first port of the kernel's range for outgoing connections (Linux's default when unknown)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a server to bind later: drawn at random below the kernel's
    ephemeral range, so that no outgoing connection is given it meanwhile, and not one rabbitmqctl uses. A
    process that binds the same port by its number may still take it first."""
    below = ephemeral_ports_from()
    while True:
        port = _port_draws.randrange(RESERVED_PORTS_FROM, below) if below > RESERVED_PORTS_FROM + 1000 else 0
        if port in CLI_DIST_PORTS:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:  # taken (or in TIME_WAIT): draw another
                continue
            chosen: int = sock.getsockname()[1]
        if chosen not in CLI_DIST_PORTS:
            return chosen


class PrivateServerError(RuntimeError):
    """A private server failed to start or to stop; the message ends with the last lines of its log."""


class EtcdServerError(PrivateServerError):
    """The private etcd failed to start or to stop."""


class RabbitBrokerError(PrivateServerError):
    """The private RabbitMQ node failed to start or to stop."""


class PrivateServer:
    """A server process that start() starts and kill() kills, with its files in base_dir (a new directory in
    `parent`, or in the system's temporary directory)."""

    def __init__(self, label: str, error: type[PrivateServerError], parent: Path | None = None) -> None:
        self.label = label
        self._error_type = error
        self.base_dir = Path(tempfile.mkdtemp(prefix=f"fluxkv-{label}-", dir=parent))
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = self.base_dir / "output.log"
        atexit.register(self.close)

    @property
    def pid(self) -> int | None:
        """The server's pid, or None when it is not running."""
        raise NotImplementedError

    def start(self) -> None:
        """Start the server; returns once it serves."""
        raise NotImplementedError

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Shut the server down gracefully, keeping its data for the next start()."""
        raise NotImplementedError

    def kill(self) -> None:
        """Kill the server, as a crash would end it; start() brings it back."""
        raise NotImplementedError

    def close(self) -> None:
        """Kill the server if it runs and delete its files; safe to call again."""
        atexit.unregister(self.close)
        try:
            if self._proc is not None:
                self.kill()
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _running_process(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise self._error_type(f"{self.label} is not running")
        return self._proc

    def _error(self, message: str) -> PrivateServerError:
        lines = self._log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        return self._error_type(f"{self.label} {message}\n--- last lines of {self._log} ---\n" + "\n".join(lines))


@dataclass(frozen=True)
class EtcdTLS:
    """TLS on etcd's client port: its certificate and key (PEM) and the CA that signed them. With client_cert_auth,
    etcd asks every client for a certificate signed by that CA; the fixture's own calls (its /health probe and
    etcdctl) present etcd's certificate, which must then be usable by a client too (trustme's are)."""

    cert_file: str
    key_file: str
    ca_file: str
    client_cert_auth: bool = False


class EtcdServer(PrivateServer):
    """A single-member etcd cluster on 127.0.0.1, started by start() and gone after close().

    The ports and the data directory stay the same across stop()/kill() and start(), so keys and leases survive a
    restart. The methods block; start() takes 0.1 to 0.5 s, a restart on existing data about 1 s. Its election
    timeout is short (500 ms): etcd raises a lease TTL below 1.5 election timeouts to that minimum, and this keeps it
    at 1 s, so lease-expiry tests can use a 1 s TTL.

    `tls` serves the client port over TLS (url is then https://). enable_auth() and add_user() set up etcd's auth
    with etcdctl (Debian's etcd-client). Its tokens are etcd's default "simple" ones, which live 5 minutes from
    their last use; with `jwt_ttl_s`, JWTs (signed with a key made here) that expire that many seconds after they
    were issued, used or not, so that a test can wait for a token to expire while it watches it.
    """

    def __init__(
        self,
        start_timeout: float = START_TIMEOUT_S,
        *,
        prefix: str = "fluxkvtest",
        parent: Path | None = None,
        tls: EtcdTLS | None = None,
        jwt_ttl_s: int | None = None,
    ) -> None:
        self.name = f"{prefix}-{os.getpid()}-{next(_numbers)}"
        super().__init__(f"etcd {self.name}", EtcdServerError, parent)
        self.start_timeout = start_timeout
        self.tls = tls
        self.jwt_ttl_s = jwt_ttl_s
        self.data_dir = self.base_dir / "data"  # etcd's keys, leases and WAL; delete it while stopped to lose them
        self.client_port = free_port()
        self.peer_port = free_port()
        while self.peer_port == self.client_port:
            self.peer_port = free_port()
        self._root_password = ""  # set by enable_auth(): etcdctl logs in as root from then on

    @property
    def endpoint(self) -> str:
        """Where clients connect, as host:port; the same for the server's whole life."""
        return f"{HOST}:{self.client_port}"

    @property
    def url(self) -> str:
        """The endpoint with its scheme: https:// with TLS, else http://."""
        return f"{'https' if self.tls is not None else 'http'}://{self.endpoint}"

    def enable_auth(self, root_password: str) -> None:
        """Create the user root (etcd's administrator: role root) and turn etcd's auth on (etcdctl auth enable);
        from then on, every call to etcd needs a user's token (or, under client_cert_auth, a certificate whose
        common name is a user)."""
        self.etcdctl("role", "add", "root")
        self.etcdctl("user", "add", "root", f"--new-user-password={root_password}")
        self.etcdctl("user", "grant-role", "root", "root")
        self.etcdctl("auth", "enable")
        self._root_password = root_password

    def add_user(self, name: str, password: str, prefix: str) -> None:
        """Create a user who may read and write the keys under `prefix` (through a role of the same name)."""
        self.etcdctl("role", "add", name)
        self.etcdctl("role", "grant-permission", name, "--prefix=true", "readwrite", prefix)
        self.etcdctl("user", "add", name, f"--new-user-password={password}")
        self.etcdctl("user", "grant-role", name, name)

    def etcdctl(self, *args: str) -> str:
        """Run `etcdctl ARGS` against this etcd (over TLS with its certificate, as root once enable_auth() ran);
        returns what it printed. EtcdServerError if it fails."""
        etcdctl = shutil.which("etcdctl")
        if etcdctl is None:
            raise EtcdServerError(
                "etcdctl is not on PATH: install Debian's etcd-client (`apt-get install etcd-client`)"
            )
        # No inherited ETCDCTL_* variable may point etcdctl elsewhere.
        env = {name: value for name, value in os.environ.items() if not name.startswith("ETCDCTL_")}
        env["ETCDCTL_API"] = "3"
        if self._root_password:
            env["ETCDCTL_USER"] = f"root:{self._root_password}"
        command = [etcdctl, f"--endpoints={self.url}", "--dial-timeout=5s", "--command-timeout=10s"]
        if self.tls is not None:
            command += [f"--cacert={self.tls.ca_file}", f"--cert={self.tls.cert_file}", f"--key={self.tls.key_file}"]
        result = subprocess.run(
            [*command, *args], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30
        )
        if result.returncode != 0:
            raise EtcdServerError(f"etcdctl {' '.join(args[:2])} failed: {result.stderr.strip() or result.stdout}")
        return result.stdout

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
            raise EtcdServerError("etcd is not on PATH: install Debian's etcd-server (`apt-get install etcd-server`)")
        client_url = self.url
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
        if self.tls is not None:
            args += [
                f"--cert-file={self.tls.cert_file}",
                f"--key-file={self.tls.key_file}",
                f"--trusted-ca-file={self.tls.ca_file}",
            ]
            if self.tls.client_cert_auth:
                args.append("--client-cert-auth")
        if self.jwt_ttl_s is not None:
            public, private = self._jwt_keys()
            args.append(f"--auth-token=jwt,pub-key={public},priv-key={private},sign-method=RS256,ttl={self.jwt_ttl_s}s")
        deadline = time.monotonic() + self.start_timeout
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                args,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C goes to its owner only, which then stops it
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

    def _jwt_keys(self) -> tuple[Path, Path]:
        """The RSA key pair etcd signs its JWTs with (PEM files, made at the first start)."""
        public, private = self.base_dir / "jwt-public.pem", self.base_dir / "jwt-private.pem"
        if not private.exists():
            # Imported here: only a JWT etcd needs it (cryptography comes with trustme, in the dev extra).
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import rsa

            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            private.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
            public.write_bytes(
                key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            )
        return public, private

    def _health_opener(self) -> urllib.request.OpenerDirector:
        """An opener for /health that asks no proxy and, with TLS, verifies etcd (and presents its certificate)."""
        if self.tls is None:
            return _no_proxy
        context = ssl.create_default_context(cafile=self.tls.ca_file)
        context.load_cert_chain(self.tls.cert_file, self.tls.key_file)
        return urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )

    def _wait_healthy(self, deadline: float) -> None:
        """Poll /health, which answers true once the member has a leader and serves reads."""
        proc = self._running_process()
        opener = self._health_opener()
        while True:
            if proc.poll() is not None:
                raise self._error(f"exited with status {proc.returncode} while starting")
            try:
                with opener.open(f"{self.url}/health", timeout=1) as answer:
                    if json.load(answer).get("health") == "true":
                        return
            except (OSError, ValueError):
                pass  # not listening yet, or not healthy yet (503)
            if time.monotonic() > deadline:
                raise self._error(f"was not healthy within {self.start_timeout} s")
            time.sleep(0.02)


@dataclass(frozen=True)
class BrokerTLS:
    """A TLS listener's PEM files: the broker's certificate (a chain allowed) and key, and the CA certificates it
    verifies clients with. With `require_client_cert`, a client must present a certificate that CA signed (RabbitMQ's
    verify_peer with fail_if_no_peer_cert); else it is not asked for one."""

    ca_file: str
    cert_file: str
    key_file: str
    require_client_cert: bool = False


class RabbitBroker(PrivateServer):
    """A private RabbitMQ node on 127.0.0.1, started by start() and gone after close().

    Its node name, Erlang cookie, ports, configuration, data and logs are its own, and so is its epmd (the Erlang
    port mapper, started with the node and ended by close()), so it neither needs nor leaves an epmd daemon. The
    user `user` (default guest, which may log in over loopback only) is created at the first start, an
    administrator with every permission on the vhost /. With `management`, the management plugin serves its HTTP
    API and UI on 127.0.0.1:management_port; else the node enables no plugin. With `tls`, it also serves AMQP over
    TLS on 127.0.0.1:tls_port (tls_url), with copies of those files in its own directory.

    The node name, data directory and ports stay the same across stop()/kill() and start(), so durable queues and
    persistent messages survive a restart. The methods block; async tests can run the slow ones (start, restart)
    with asyncio.to_thread.
    """

    def __init__(
        self,
        start_timeout: float = RABBITMQ_START_TIMEOUT_S,
        *,
        user: str = "guest",
        password: str = "guest",
        management: bool = False,
        tls: BrokerTLS | None = None,
        prefix: str = "fluxkvtest",
        parent: Path | None = None,
    ) -> None:
        self.node = f"{prefix}-{os.getpid()}-{next(_numbers)}@localhost"
        super().__init__(self.node, RabbitBrokerError, parent)
        self.start_timeout = start_timeout
        self.user = user
        self._password = password
        self._port = free_port()
        self.management_port: int | None = free_port() if management else None
        self._tls = tls
        self.tls_port: int | None = None  # AMQP over TLS, with `tls`
        if tls is not None:
            while self.tls_port in (None, self._port, self.management_port):
                self.tls_port = free_port()
        self._epmd_port = free_port()
        self._epmd: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._pid_file = self.base_dir / "node.pid"
        self._env = self._configure()

    @property
    def port(self) -> int:
        """The AMQP port; the same for the broker's whole life."""
        return self._port

    @property
    def url(self) -> str:
        """Where `user` logs in."""
        return self._url("amqp", self._port)

    @property
    def tls_url(self) -> str:
        """Where `user` logs in over TLS (amqps://), with `tls`."""
        if self.tls_port is None:
            raise RabbitBrokerError(f"{self.node} has no TLS listener: start it with tls=BrokerTLS(...)")
        return self._url("amqps", self.tls_port)

    def _url(self, scheme: str, port: int) -> str:
        user, password = (urllib.parse.quote(s, safe="") for s in (self.user, self._password))
        return f"{scheme}://{user}:{password}@{HOST}:{port}/"

    @property
    def pid(self) -> int | None:
        """The OS pid of the node's Erlang VM (beam.smp), or None when it is not running."""
        return self._pid

    @property
    def epmd_pid(self) -> int | None:
        """The pid of the node's own epmd, or None before the first start() and after close()."""
        return None if self._epmd is None else self._epmd.pid

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
        conf = [
            f"listeners.tcp.local = {HOST}:{self._port}",
            f"default_user = {self.user}",
            f"default_pass = {self._password}",
            "default_user_tags.administrator = true",
        ]
        if self._tls is not None:
            conf += self._tls_configuration(self._tls)
        plugins = []
        if self.management_port is not None:
            conf += [f"management.tcp.ip = {HOST}", f"management.tcp.port = {self.management_port}"]
            plugins.append("rabbitmq_management")
        conf_file = self.base_dir / "rabbitmq.conf"
        conf_file.touch(0o600)  # it holds the password
        conf_file.write_text("\n".join(conf) + "\n")
        (self.base_dir / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
        # Inherited RABBITMQ_* or ERL_* settings could point the node or the CLI elsewhere.
        env = {name: value for name, value in os.environ.items() if not name.startswith(("RABBITMQ_", "ERL_"))}
        env.update(
            HOME=str(home),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_CONF_ENV_FILE=str(self.base_dir / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(conf_file),
            RABBITMQ_CONFIG_FILES=str(self.base_dir / "conf.d"),  # does not exist: no /etc/rabbitmq/conf.d
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.base_dir / "advanced.config"),  # does not exist either
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base_dir / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(self.base_dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base_dir / "log"),
            RABBITMQ_PID_FILE=str(self._pid_file),
            # Erlang distribution on loopback only, through this node's own epmd.
            ERL_EPMD_ADDRESS=HOST,
            ERL_EPMD_PORT=str(self._epmd_port),
            ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _tls_configuration(self, tls: BrokerTLS) -> list[str]:
        """rabbitmq.conf's lines for the TLS listener, on copies of its files that the node owns."""
        tls_dir = self.base_dir / "tls"
        tls_dir.mkdir(mode=0o700)
        files = {}
        for name, source in (("cacertfile", tls.ca_file), ("certfile", tls.cert_file), ("keyfile", tls.key_file)):
            files[name] = tls_dir / f"{name}.pem"
            shutil.copyfile(source, files[name])
            files[name].chmod(0o600)
        return [
            f"listeners.ssl.default = {HOST}:{self.tls_port}",
            *(f"ssl_options.{name} = {path}" for name, path in files.items()),
            f"ssl_options.verify = {'verify_peer' if tls.require_client_cert else 'verify_none'}",
            f"ssl_options.fail_if_no_peer_cert = {'true' if tls.require_client_cert else 'false'}",
        ]

    def start(self) -> None:
        """Boot the node; returns once it has fully started and its ports accept connections."""
        if self._proc is not None:
            raise RabbitBrokerError(f"{self.node} is already running")
        deadline = time.monotonic() + self.start_timeout
        if self._epmd is None:
            self._start_epmd(deadline)
        listeners = [("AMQP", self._port)] + ([("AMQP over TLS", self.tls_port)] if self.tls_port is not None else [])
        with contextlib.ExitStack() as held:  # held while the inter-node port is chosen, so that they all differ
            for kind, port in listeners:
                sock = held.enter_context(socket.socket())
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the broker's: TIME_WAIT does not count
                try:
                    sock.bind((HOST, port))
                except OSError:
                    raise RabbitBrokerError(f"{self.node}: its {kind} port {port} is taken") from None
            # The inter-node port need not stay the same, so a fresh one spares restart() a port clash.
            dist_port = free_port()
        self._pid_file.unlink(missing_ok=True)
        with self._log.open("ab") as output:
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
            self._wait_for_port(self._port, deadline, self._running_process(), "")
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

    def close(self) -> None:
        """Kill the node if it runs, end its epmd and delete its files; safe to call again."""
        try:
            super().close()
        finally:
            if self._epmd is not None:
                with contextlib.suppress(ProcessLookupError):
                    self._epmd.kill()
                self._epmd.wait()
                self._epmd = None

    def _start_epmd(self, deadline: float) -> None:
        epmd = shutil.which("epmd") or "/usr/lib/erlang/bin/epmd"
        with self._log.open("ab") as output:
            self._epmd = subprocess.Popen(
                [epmd, "-port", str(self._epmd_port), "-address", HOST],
                env=self._env,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_for_port(self._epmd_port, deadline, self._epmd, "its epmd ")

    def _wait_for_port(self, port: int, deadline: float, proc: subprocess.Popen[bytes], subject: str) -> None:
        """Wait until `port` accepts connections; `subject` names the process that opens it ("" for the node)."""
        while True:
            if proc.poll() is not None:
                raise self._error(f"{subject}exited with status {proc.returncode} while starting")
            try:
                socket.create_connection((HOST, port), timeout=1).close()
            except OSError:
                pass
            else:
                return
            if time.monotonic() > deadline:
                raise self._error(f"{subject}did not open port {port} within {self.start_timeout} s")
            time.sleep(0.05)

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
