#!/usr/bin/env python3
"""Run the stack of deploy/docker-compose.yml on this machine, without Docker.

    .venv/bin/python deploy/native_stack.py up [--dir DIR] [--env-file FILE] [--compose FILE]

It reads the compose file (interpolated as `docker compose --env-file FILE` does: the shell's variables, then
FILE's; FILE is deploy/.env, or deploy/.env.example when there is none) and starts its services in the order of
their depends_on, each once the ones it depends on are ready:

- etcd (quay.io/coreos/etcd) and RabbitMQ (rabbitmq:*) as private instances of Debian's etcd-server and
  rabbitmq-server (deploy/private_servers.py): free ports on 127.0.0.1, files in DIR, no system service touched.
  The broker gets the user of the service's RABBITMQ_DEFAULT_USER and RABBITMQ_DEFAULT_PASS, and its management UI.
- Jaeger has no Debian package and is not started: tracing is off. Variables that point at it are dropped and
  OTEL_SDK_DISABLED=true is set instead.
- The services built from the Dockerfile run as processes of this checkout (cmd/<entrypoint>), with the image's ENV
  and then the service's environment and command, in which the service host names become 127.0.0.1 (and
  FLUX_SERVER_HOST 0.0.0.0 too), each port of the compose file a free port, and each path in a named volume a path
  in DIR/volumes/<volume>. Such a service is ready once the image's HEALTHCHECK command, run with its environment,
  succeeds (or at once when the service disables its health check); its output goes to DIR/logs/<service>.log.

It then prints what runs where (DIR/stack.json has the same, for scripts), with the URL of each fluxkv-gateway
service, and waits. Ctrl-C or SIGTERM stops every service, those that depend on others first, and exits 0. A service
that fails to start stops the ones started before it, and the program exits 1 with the reason. Without --dir, DIR is
a new temporary directory, deleted at exit; with it, the volumes (append-only files, the CDC consumer's output) stay
there for the next run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import yaml

DEPLOY = Path(__file__).resolve().parent
ROOT = DEPLOY.parent
sys.path.insert(0, str(ROOT))  # run as a script: deploy/private_servers.py beside it

from deploy.private_servers import EtcdServer, PrivateServer, PrivateServerError, RabbitBroker, free_port  # noqa: E402

LOCALHOST = "127.0.0.1"
READY_TIMEOUT_S = 90.0
HEALTHCHECK_PAUSE_S = 0.2
WATCH_INTERVAL_S = 0.5
DEFAULT_STOP_GRACE_S = 10.0  # as docker compose's
LOG_TAIL_LINES = 20
ETCD_CLIENT_PORT = 2379
AMQP_PORT = 5672
RABBITMQ_UI_PORT = 15672
# Variables whose value is a host name (or an address to listen on) rather than host:port or a URL.
HOST_VARIABLES = ("FLUX_SERVER_HOST", "FLUX_POD_IP")
GATEWAY_PROGRAM = "fluxkv-gateway"
GATEWAY_PORT_VARIABLE = "FLUX_GATEWAY_PORT"


class StackError(Exception):
    """The stack cannot run as the compose file describes, or a service failed; the message says why."""


class Stopped(Exception):
    """SIGINT or SIGTERM arrived."""


# -- reading the compose file, the env file and the Dockerfile -------------------------------------------------

_REFERENCE = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[?-])([^}]*))?\}|(\w+)|)")


def interpolate(text: str, variables: Mapping[str, str], where: str) -> str:
    """`text` with $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error} and $$ replaced as
    docker compose does (an unset variable without a default becomes "", with a warning)."""

    def replace(match: re.Match[str]) -> str:
        dollar, name, op, argument, bare = match.groups()
        if dollar:
            return "$"
        name = name or bare
        if name is None:
            raise StackError(f"{where}: cannot interpolate {text!r} (a literal $ is written $$)")
        value = variables.get(name)
        if op in (":?", ":-") and value == "":
            value = None
        if value is not None:
            return value
        if op is not None and op.endswith("?"):
            raise StackError(f"{where}: required variable {name} is missing a value: {argument}")
        if op is not None:
            return str(argument)
        print(f"native_stack: warning: {name} is not set; {where} gets an empty string instead", file=sys.stderr)
        return ""

    return _REFERENCE.sub(replace, text)


def _interpolate_tree(node: Any, variables: Mapping[str, str], where: str) -> Any:
    if isinstance(node, str):
        return interpolate(node, variables, where)
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, variables, f"{where}.{key}") for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(value, variables, f"{where}[{i}]") for i, value in enumerate(node)]
    return node


def load_compose(path: Path, variables: Mapping[str, str]) -> dict[str, Any]:
    """The compose file, parsed (YAML merge keys resolved) and interpolated with `variables`."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise StackError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("services"), dict):
        raise StackError(f"{path}: no services")
    compose: dict[str, Any] = _interpolate_tree(data, variables, path.name)
    return compose


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of a compose env file: blank lines and # comments skipped, quotes removed."""
    variables: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise StackError(f"cannot read the env file {path}: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not re.fullmatch(r"\w+", key.strip()):
            raise StackError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].rstrip()
        variables[key.strip()] = value
    return variables


def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each stage of a Dockerfile, as (INSTRUCTION, arguments): continuation lines joined,
    comments (and parser directives) dropped."""
    stages: list[list[tuple[str, str]]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#"):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        instruction, _, arguments = pending.strip().partition(" ")
        pending = ""
        if not instruction:
            continue
        if instruction.upper() == "FROM":
            stages.append([])
        if not stages:
            raise StackError(f"{path}: {instruction} before the first FROM")
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


@dataclass(frozen=True)
class Image:
    """What the services built from a Dockerfile inherit from its last stage."""

    entrypoint: list[str]
    env: dict[str, str]
    healthcheck: list[str] | None  # the HEALTHCHECK's CMD, exec form


def image_of(dockerfile: Path) -> Image:
    entrypoint: list[str] = []
    env: dict[str, str] = {}
    healthcheck: list[str] | None = None
    for instruction, arguments in dockerfile_stages(dockerfile)[-1]:
        if instruction == "ENTRYPOINT":
            entrypoint = _exec_form(arguments, dockerfile)
        elif instruction == "ENV":
            words = shlex.split(arguments)
            if words and "=" not in words[0]:  # the old form: ENV KEY VALUE
                env[words[0]] = arguments.split(None, 1)[1]
            else:
                for word in words:
                    key, _, value = word.partition("=")
                    env[key] = value
        elif instruction == "HEALTHCHECK":
            command = arguments.partition(" CMD ")[2] or arguments.removeprefix("CMD ")
            healthcheck = None if arguments.strip() == "NONE" else _exec_form(command, dockerfile)
    return Image(entrypoint, env, healthcheck)


def _exec_form(text: str, where: Path) -> list[str]:
    try:
        words = json.loads(text)
    except ValueError:
        words = None
    if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
        raise StackError(f"{where}: expected the exec form (a JSON array of strings), got {text!r}")
    return words


def container_ports(spec: Mapping[str, Any]) -> list[int]:
    """The container ports a service publishes or exposes."""
    ports: list[int] = []
    for entry in [*spec.get("ports", []), *spec.get("expose", [])]:
        target = entry.get("target") if isinstance(entry, dict) else str(entry).rsplit(":", 1)[-1]
        try:
            ports.append(int(str(target).removesuffix("/tcp")))
        except ValueError:
            raise StackError(f"cannot run the port {entry!r} here: expected one TCP port") from None
    return ports


def dependencies(spec: Mapping[str, Any]) -> list[str]:
    depends = spec.get("depends_on", [])
    return list(depends) if isinstance(depends, (list, dict)) else []


def start_order(services: Mapping[str, Any]) -> list[list[str]]:
    """The services in levels: each one's dependencies are in earlier levels (compose file order within one)."""
    levels: list[list[str]] = []
    placed: set[str] = set()
    while len(placed) < len(services):
        level = [
            name
            for name, spec in services.items()
            if name not in placed and all(d in placed for d in dependencies(spec))
        ]
        if not level:
            rest = sorted(set(services) - placed)
            raise StackError(f"depends_on: a cycle, or a service that does not exist, among {', '.join(rest)}")
        levels.append(level)
        placed.update(level)
    return levels


def stop_grace_s(spec: Mapping[str, Any]) -> float:
    """The service's stop_grace_period (compose durations such as 30s, 1m30s, 500ms)."""
    text = str(spec.get("stop_grace_period", "")).strip()
    if not text:
        return DEFAULT_STOP_GRACE_S
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    if "".join(n + u for n, u in parts) != text:
        raise StackError(f"stop_grace_period: cannot read {text!r}")
    return sum(float(n) * units[u] for n, u in parts)


# -- the services ------------------------------------------------------------------------------------------------


@dataclass
class Service:
    """A service of the compose file, as it runs here."""

    name: str
    spec: dict[str, Any]
    ports: dict[int, int] = field(default_factory=dict)  # container port -> port on 127.0.0.1
    volumes: dict[str, Path] = field(default_factory=dict)  # path in the container -> directory here
    note: str = ""

    @property
    def pid(self) -> int | None:
        raise NotImplementedError

    def start(self) -> None:
        """Start the service; returns once it is ready."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the service gracefully if it runs."""
        raise NotImplementedError

    def close(self) -> None:
        """Kill what is left of it; safe to call again."""
        raise NotImplementedError


@dataclass
class SkippedService(Service):
    """A service that does not run here (its `note` says why)."""

    @property
    def pid(self) -> int | None:
        return None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class ServerService(Service):
    """etcd or RabbitMQ: a private server of deploy/private_servers.py."""

    server: PrivateServer = field(kw_only=True)

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def start(self) -> None:
        try:
            self.server.start()
        except PrivateServerError as exc:
            raise StackError(f"{self.name}: {exc}") from None

    def stop(self) -> None:
        if self.server.pid is not None:
            try:
                self.server.stop()
            except PrivateServerError as exc:
                print(f"native_stack: {self.name}: {exc}", file=sys.stderr)

    def close(self) -> None:
        self.server.close()


@dataclass
class ProgramService(Service):
    """A service built from the Dockerfile: a program of this checkout."""

    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    healthcheck: list[str] | None = None
    log: Path = Path()
    cwd: Path = Path()
    proc: subprocess.Popen[bytes] | None = None
    exit_reported: bool = False
    url: str = ""  # a fluxkv-gateway's HTTP API

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        """Start the program; returns once its health check passes (at once without one)."""
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a terminal's Ctrl-C comes to native_stack, which stops it in order
            )
        if self.healthcheck is None:
            return
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise StackError(f"{self.name} exited with status {self.proc.returncode} while starting{self.tail()}")
            # cwd: `python -m fluxkv....` finds this checkout's package
            check = subprocess.run(self.healthcheck, env=self.env, cwd=ROOT, capture_output=True, text=True)
            if check.returncode == 0:
                return
            if time.monotonic() > deadline:
                reason = check.stderr.strip() or f"exit status {check.returncode}"
                raise StackError(f"{self.name} was not healthy within {READY_TIMEOUT_S:.0f} s: {reason}{self.tail()}")
            time.sleep(HEALTHCHECK_PAUSE_S)

    def tail(self) -> str:
        lines = self.log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
        return f"\n--- last lines of {self.log} ---\n" + "\n".join(lines)

    def signal(self) -> None:
        """Send the service's stop_signal (SIGTERM by default)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.Signals[str(self.spec.get("stop_signal", "SIGTERM"))])

    def wait(self) -> None:
        """Wait for the exit, at most the service's stop_grace_period, then SIGKILL."""
        if self.proc is None:
            return
        try:
            self.proc.wait(stop_grace_s(self.spec))
        except subprocess.TimeoutExpired:
            print(f"native_stack: {self.name} did not stop within its stop_grace_period; killing it", file=sys.stderr)
            self.close()

    def stop(self) -> None:
        self.signal()
        self.wait()

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()


class Stack:
    """The services of one compose file, set up to run here; nothing runs before start()."""

    def __init__(self, compose_file: Path, variables: Mapping[str, str], directory: Path) -> None:
        self.compose_file = compose_file
        self.dir = directory
        compose = load_compose(compose_file, variables)
        self.specs: dict[str, dict[str, Any]] = compose["services"]
        self.named_volumes = set(compose.get("volumes") or {})
        self.levels = start_order(self.specs)
        self.services: dict[str, Service] = {}
        self.tracing_off: dict[str, list[str]] = {}  # service -> the variables dropped
        try:
            for name, spec in self.specs.items():
                self.services[name] = self._service(name, spec)
            for service in self.services.values():
                if isinstance(service, ProgramService):
                    self._prepare(service)
        except BaseException:
            self.close()
            raise

    def _free_port(self) -> int:
        taken = {port for service in self.services.values() for port in service.ports.values()}
        while (port := free_port()) in taken:
            pass
        return port

    def _service(self, name: str, spec: dict[str, Any]) -> Service:
        image = str(spec.get("image", ""))
        if "build" in spec:
            return ProgramService(name, spec, ports={port: self._free_port() for port in container_ports(spec)})
        if image.startswith("quay.io/coreos/etcd:"):
            etcd = EtcdServer(prefix="fluxkv-stack", parent=self.dir)
            return ServerService(name, spec, {ETCD_CLIENT_PORT: etcd.client_port}, server=etcd)
        if image.startswith("rabbitmq:"):
            env = _environment(spec)
            broker = RabbitBroker(
                user=env.get("RABBITMQ_DEFAULT_USER", "guest"),
                password=env.get("RABBITMQ_DEFAULT_PASS", "guest"),
                management="management" in image,
                prefix="fluxkv-stack",
                parent=self.dir,
            )
            ports = {AMQP_PORT: broker.port}
            if broker.management_port is not None:
                ports[RABBITMQ_UI_PORT] = broker.management_port
            return ServerService(name, spec, ports, note=f"user {broker.user}", server=broker)
        if image.startswith("jaegertracing/"):
            return SkippedService(name, spec, note="not started: no Debian package; tracing is off")
        raise StackError(f"{name}: no native way to run the image {image!r}")

    def _prepare(self, service: ProgramService) -> None:
        """The service's command line, environment and health check here, from the image and the compose file."""
        spec = service.spec
        build = spec["build"] if isinstance(spec["build"], dict) else {"context": spec["build"]}
        context = (self.compose_file.parent / str(build.get("context", "."))).resolve()
        image = image_of(context / str(build.get("dockerfile", "Dockerfile")))
        entrypoint = spec.get("entrypoint", image.entrypoint)
        command = spec.get("command", [])
        argv = [*_words(entrypoint), *_words(command)]
        if not argv or not (ROOT / "cmd" / argv[0]).is_file():
            raise StackError(f"{service.name}: runs {argv[:1]}, which is no program of cmd/ in this checkout")
        for entry in spec.get("volumes", []):
            source, target = (entry["source"], entry["target"]) if isinstance(entry, dict) else entry.split(":")[:2]
            named = source in self.named_volumes
            service.volumes[target] = self.dir / "volumes" / source if named else self.compose_file.parent / source
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FLUX_", "OTEL_"))}
        set_ports = set()
        for key, value in {**image.env, **_environment(spec)}.items():
            native = self._rewrite(service, value, key)
            if native is None:
                self.tracing_off.setdefault(service.name, []).append(key)
                continue
            env[key] = native
            if key.endswith("_PORT") and value.isdigit():
                set_ports.add(int(value))
        if service.name in self.tracing_off:
            env["OTEL_SDK_DISABLED"] = "true"
        if argv[0] == GATEWAY_PROGRAM and GATEWAY_PORT_VARIABLE in env:
            service.url = f"http://{LOCALHOST}:{env[GATEWAY_PORT_VARIABLE]}/"
        for port in service.ports.keys() - set_ports:
            raise StackError(f"{service.name}: port {port} is published, but no *_PORT variable sets it")
        args = [self._rewrite(service, a) for a in argv[1:]]
        if None in args:
            raise StackError(f"{service.name}: its command names a service that does not run here: {argv}")
        service.argv = [sys.executable, str(ROOT / "cmd" / argv[0]), *(a for a in args if a is not None)]
        service.env = env
        health = spec.get("healthcheck") or {}
        if not health.get("disable"):
            test = health.get("test") or (["CMD", *image.healthcheck] if image.healthcheck else None)
            if test is not None:
                if test[0] != "CMD":
                    raise StackError(f"{service.name}: expected a health check of the form [CMD, ...], got {test!r}")
                service.healthcheck = [sys.executable if w == "python" else w for w in test[1:]]
        service.log = self.dir / "logs" / f"{service.name}.log"
        service.cwd = self.dir

    def _rewrite(self, service: Service, value: str, variable: str = "") -> str | None:
        """`value` for a process here; None when it points at a service that does not run here."""
        if variable in HOST_VARIABLES and (value in self.services or value in ("0.0.0.0", "::")):
            return LOCALHOST
        if variable.endswith("_PORT") and value.isdigit() and int(value) in service.ports:
            return str(service.ports[int(value)])
        names = "|".join(re.escape(n) for n in sorted(self.services, key=len, reverse=True))
        reference = re.compile(rf"(?<![\w.-])({names}):(\d+)(?![\w.-])")
        if any(isinstance(self.services[m.group(1)], SkippedService) for m in reference.finditer(value)):
            return None

        def here(match: re.Match[str]) -> str:
            other, port = self.services[match.group(1)], int(match.group(2))
            if port not in other.ports:
                raise StackError(f"{service.name}: {match.group(0)} is no port of {other.name} that runs here")
            return f"{LOCALHOST}:{other.ports[port]}"

        value = reference.sub(here, value)
        for target, directory in service.volumes.items():
            if value == target or value.startswith(target.rstrip("/") + "/"):
                return str(directory) + value[len(target.rstrip("/")) :]
        return value

    def start(self) -> None:
        """Start every service, level by level; a failure raises StackError (close() cleans up)."""
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        for service in self.services.values():
            for directory in service.volumes.values():
                directory.mkdir(parents=True, exist_ok=True)
        for level in self.levels:
            for name in level:
                service = self.services[name]
                doing = service.note if isinstance(service, SkippedService) else "starting"
                print(f"native_stack: {name}: {doing}", file=sys.stderr, flush=True)
                service.start()

    def stop(self) -> None:
        """Stop every service gracefully, those that depend on others first (a level at a time)."""
        for level in reversed(self.levels):
            services = [self.services[name] for name in level]
            programs = [s for s in services if isinstance(s, ProgramService)]
            for program in programs:
                program.signal()
            for program in programs:
                program.wait()
            for service in services:
                if not isinstance(service, ProgramService):
                    service.stop()

    def close(self) -> None:
        """Kill whatever still runs, and delete the private servers' files."""
        for service in reversed(self.services.values()):
            service.close()

    def watch(self) -> NoReturn:
        """Report every program that exits while the stack runs; ends only with an exception (a signal)."""
        programs = [s for s in self.services.values() if isinstance(s, ProgramService)]
        while True:
            for program in programs:
                if program.proc is not None and not program.exit_reported and program.proc.poll() is not None:
                    program.exit_reported = True
                    code = program.proc.returncode
                    print(f"native_stack: {program.name} exited with status {code}; see {program.log}", file=sys.stderr)
            time.sleep(WATCH_INTERVAL_S)

    def describe(self) -> dict[str, Any]:
        """What runs where, as DIR/stack.json holds it."""
        services: dict[str, Any] = {}
        for name, service in self.services.items():
            entry: dict[str, Any] = {
                "pid": service.pid,
                "ports": {str(c): n for c, n in service.ports.items()},
                "volumes": {t: str(d) for t, d in service.volumes.items()},
                "note": service.note,
            }
            if isinstance(service, ProgramService):
                entry.update(argv=service.argv, log=str(service.log), tracing_off=self.tracing_off.get(name, []))
                if service.url:
                    entry["url"] = service.url
            services[name] = entry
        return {"dir": str(self.dir), "compose_file": str(self.compose_file), "services": services}

    def table(self) -> str:
        rows = [("service", "pid", "ports (compose -> here)", "notes")]
        for name, service in self.services.items():
            ports = ", ".join(f"{c} -> {LOCALHOST}:{n}" for c, n in service.ports.items())
            notes = [service.note] if service.note else []
            notes += [f"{t} is {d}" for t, d in service.volumes.items()]
            if isinstance(service, ProgramService):
                notes += [f"HTTP API {service.url}"] if service.url else []
                notes.append(f"log {service.log}")
                if name in self.tracing_off:
                    notes.append(f"dropped {', '.join(self.tracing_off[name])}: they point at a service not run here")
            rows.append((name, str(service.pid or "-"), ports or "-", "; ".join(notes)))
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3]
                         for row in rows)  # fmt: skip


def _environment(spec: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment, in either of compose's forms (a mapping, or KEY=VALUE strings); a variable
    without a value (taken from the shell by compose) is left out."""
    env = spec.get("environment") or {}
    if isinstance(env, list):
        pairs = [str(item).partition("=") for item in env]
        return {key: value for key, sep, value in pairs if sep}
    return {str(key): str(value) for key, value in env.items() if value is not None}


def _words(value: str | list[str]) -> list[str]:
    """An entrypoint or command, in either of compose's forms (a list, or a string split as a shell would)."""
    return shlex.split(value) if isinstance(value, str) else [str(word) for word in value]


# -- the program -------------------------------------------------------------------------------------------------


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """While the stack stops: another Ctrl-C must not cut the clean-up short."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def up(compose_file: Path, env_file: Path, directory: Path | None) -> int:
    """Run the stack until SIGINT or SIGTERM (exit status 0), or until it fails (1)."""
    base = Path(tempfile.mkdtemp(prefix="fluxkv-stack-")) if directory is None else directory.resolve()
    stack: Stack | None = None
    try:
        base.mkdir(parents=True, exist_ok=True)
        stack = Stack(compose_file, {**read_env_file(env_file), **os.environ}, base)
        stack.start()
        (base / "stack.json").write_text(json.dumps(stack.describe(), indent=2) + "\n")
        print(stack.table())
        tries = []
        etcd = next(
            (s for s in stack.services.values() if isinstance(s, ServerService) and ETCD_CLIENT_PORT in s.ports), None
        )
        if etcd is not None:
            where = f"{LOCALHOST}:{etcd.ports[ETCD_CLIENT_PORT]}"
            bin_dir = Path(sys.executable).parent
            tries += [
                f"{bin_dir / 'fluxkv'} --etcd {where} set greeting hello",
                f"{bin_dir / 'fluxkv-bench'} --etcd {where} -t mixed -n 20000",
            ]
        for gateway in stack.services.values():
            if isinstance(gateway, ProgramService) and gateway.url:
                tries.append(f"curl '{gateway.url}api/v1/kv?key=greeting'")
        for i, line in enumerate(tries):
            print(f"\ntry:  {line}" if i == 0 else f"      {line}")
        kept = "deleted at exit; --dir DIR keeps them" if directory is None else "the volumes stay there"
        print(f"files in {base} ({kept}); what runs where: {base / 'stack.json'}")
        print("the stack is up; Ctrl-C or SIGTERM stops it", flush=True)
        stack.watch()
    except Stopped as stopped:
        print(f"native_stack: {stopped}: stopping the stack", file=sys.stderr, flush=True)
        return 0
    except (StackError, OSError) as exc:
        print(f"native_stack: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        with _signals_ignored():
            if stack is not None:
                stack.stop()
                stack.close()
            if directory is None:
                shutil.rmtree(base, ignore_errors=True)
            print("native_stack: stopped", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="native_stack.py",
        description="Run the services of deploy/docker-compose.yml on this machine, without Docker.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("up", help="start the stack; Ctrl-C or SIGTERM stops it")
    run.add_argument(
        "--compose", type=Path, default=DEPLOY / "docker-compose.yml", help="the compose file (default: %(default)s)"
    )
    run.add_argument(
        "--env-file",
        type=Path,
        help="variables for the compose file (default: deploy/.env, else deploy/.env.example)",
    )
    run.add_argument(
        "--dir", type=Path, help="where the services' files go (default: a temporary directory, deleted at exit)"
    )
    args = parser.parse_args(argv)
    env_file = args.env_file
    if env_file is None:
        env_file = DEPLOY / ".env" if (DEPLOY / ".env").exists() else DEPLOY / ".env.example"
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_stopped)
    sys.exit(up(args.compose.resolve(), env_file, args.dir))


if __name__ == "__main__":
    main()
