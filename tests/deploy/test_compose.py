"""deploy/ and the Dockerfile agree with the programs they run. Docker cannot run here, so the files themselves are
checked (read as deploy/native_stack.py reads them); tests/deploy/test_stack.py runs the same stack without Docker."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from deploy import native_stack
from fluxkv import config
from fluxkv.cdc import consumer as cdc_consumer
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
EXAMPLE = native_stack.read_env_file(DEPLOY / ".env.example")
NODES = ("fluxkv-1", "fluxkv-2", "fluxkv-3")
CONSUMER = "fluxkv-cdc"
GATEWAY = "fluxkv-gateway"


def services() -> dict[str, Any]:
    """The services, interpolated with the example env file as `docker compose --env-file` would."""
    data = native_stack.load_compose(COMPOSE_FILE, EXAMPLE)
    result: dict[str, Any] = data["services"]
    return result


IMAGE = native_stack.image_of(ROOT / "Dockerfile")


def program(spec: dict[str, Any]) -> str:
    return str(spec.get("entrypoint", IMAGE.entrypoint)[0])


def environment(spec: dict[str, Any]) -> dict[str, str]:
    """What the service's process sees: the image's ENV, then the service's environment."""
    return {**IMAGE.env, **{k: str(v) for k, v in spec.get("environment", {}).items()}}


def flux_variables(spec: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in environment(spec).items() if k.startswith("FLUX_")}


def published(spec: dict[str, Any]) -> set[tuple[str, int, int]]:
    """(host IP, host port, container port) of each published port."""
    result = set()
    for entry in spec["ports"]:
        host_ip, host_port, container_port = str(entry).split(":")
        result.add((host_ip, int(host_port), int(container_port)))
    return result


def setting(env: str) -> config.Setting:
    found = [s for s in config.SETTINGS if s.env == env]
    assert found, f"{env} is not a setting of fluxkv-server"
    return found[0]


def test_the_stack_has_its_services_and_images() -> None:
    s = services()
    assert set(s) == {"etcd", "rabbitmq", "jaeger", *NODES, CONSUMER, GATEWAY}
    assert s["etcd"]["image"].startswith("quay.io/coreos/etcd:v3.")
    assert s["rabbitmq"]["image"] == "rabbitmq:3-management"
    assert s["jaeger"]["image"].startswith("jaegertracing/all-in-one:")
    assert s["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert {(p[1], p[2]) for p in published(s["jaeger"])} == {(16686, 16686), (4317, 4317)}
    assert {(p[1], p[2]) for p in published(s["rabbitmq"])} == {(5672, 5672), (15672, 15672)}
    assert {(p[1], p[2]) for p in published(s["etcd"])} == {(2379, 2379)}
    for name in (*NODES, CONSUMER, GATEWAY):
        assert s[name]["build"] == {"context": "..", "dockerfile": "Dockerfile"}, name
        assert s[name]["image"] == "fluxkv:local", name
    assert [program(s[n]) for n in NODES] == ["fluxkv-server"] * 3
    assert program(s[CONSUMER]) == "fluxkv-cdc"
    assert program(s[GATEWAY]) == "fluxkv-gateway"


def test_ports_are_published_on_loopback_only() -> None:
    for name, spec in services().items():
        for host_ip, _, _ in published(spec) if "ports" in spec else ():
            assert host_ip == "127.0.0.1", name


def test_every_flux_variable_of_a_node_is_a_setting_with_a_valid_value() -> None:
    known = {s.env for s in config.SETTINGS}
    for name in NODES:
        flux = flux_variables(services()[name])
        assert set(flux) <= known, f"{name}: variables fluxkv-server does not read: {sorted(set(flux) - known)}"
        config.load({}, flux)  # raises ConfigError on an invalid value


def test_the_consumer_reads_every_flux_variable_it_is_given() -> None:
    s = services()
    spec = s[CONSUMER]
    flux = flux_variables(spec)
    read = set(cdc_consumer.VARIABLES.values())
    assert set(flux) <= read, f"variables fluxkv-cdc does not read: {sorted(set(flux) - read)}"
    options = cdc_consumer.parse_args(spec["command"], flux)  # exits 2 on an invalid value
    assert options.output is not None and options.output.startswith("/data/")
    assert spec["volumes"] == ["cdc-events:/data"]
    # It consumes what the nodes publish.
    for name in NODES:
        node = config.load({}, flux_variables(s[name]))
        assert (node.rabbitmq_url, node.cdc_exchange, node.cdc_exchange_type, node.cdc_queue) == (
            options.url,
            options.exchange,
            options.exchange_type,
            options.queue,
        )


def test_nodes_listen_on_all_interfaces_on_their_published_ports() -> None:
    grpc_ports, admin_ports = set(), set()
    for name in NODES:
        spec = services()[name]
        settings = config.load({}, flux_variables(spec))
        admin_port = int(environment(spec)["FLUX_ADMIN_PORT"])
        assert settings.host == "0.0.0.0", name
        # Published as the same port: the address a node registers is valid on the host too.
        assert {(p[1], p[2]) for p in published(spec)} == {(settings.port, settings.port), (admin_port, admin_port)}
        grpc_ports.add(settings.port)
        admin_ports.add(admin_port)
    assert len(grpc_ports) == len(admin_ports) == len(NODES)


def test_each_node_has_its_identity_its_volume_and_the_cluster() -> None:
    s = services()
    volumes = []
    for name in NODES:
        env = environment(s[name])
        assert env["FLUX_NODE_ID"] == env["FLUX_POD_IP"] == name
        assert env["FLUX_ETCD_ENDPOINTS"] == "etcd:2379"
        assert config.load({}, flux_variables(s[name])).rabbitmq_url.endswith("@rabbitmq:5672/")
        assert env["FLUX_AOF_FILENAME"].startswith("/data/")
        assert env["FLUX_AOF_APPEND_FSYNC"] in ("always", "everysec", "no")
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        assert env["OTEL_SERVICE_NAME"] == "fluxkv"
        assert 0 <= float(env["FLUX_TRACE_SAMPLE_RATIO"]) <= 1
        assert env["FLUX_LOG_FORMAT"] in ("console", "json")
        [volume] = s[name]["volumes"]
        source, target = volume.split(":")
        assert target == "/data"
        volumes.append(source)
    assert len(set(volumes)) == len(NODES)
    declared = native_stack.load_compose(COMPOSE_FILE, EXAMPLE)["volumes"]
    assert set(volumes) | {"cdc-events"} <= set(declared)


def test_services_wait_for_what_they_need_to_be_healthy() -> None:
    s = services()
    for name in NODES:
        assert s[name]["depends_on"] == {d: {"condition": "service_healthy"} for d in ("etcd", "rabbitmq", "jaeger")}
        assert "healthcheck" not in s[name]  # the image's: python -m fluxkv.server.healthcheck
    assert s[CONSUMER]["depends_on"] == {"rabbitmq": {"condition": "service_healthy"}}
    assert s[CONSUMER]["healthcheck"] == {"disable": True}  # the image's checks a node's gRPC port
    assert s[GATEWAY]["depends_on"] == {d: {"condition": "service_healthy"} for d in ("etcd", *NODES)}
    assert s[GATEWAY]["healthcheck"]["test"][:2] == ["CMD", "python"]  # its own: GET /health
    for name in ("etcd", "rabbitmq", "jaeger"):
        assert s[name]["healthcheck"]["test"][0] == "CMD", name


def test_the_gateway_serves_flux_kvs_port_over_the_nodes_in_etcd_and_traces_like_them() -> None:
    s = services()
    spec = s[GATEWAY]
    flux = flux_variables(spec)
    assert set(flux) <= {st.env for st in config.SETTINGS}, "variables fluxkv-gateway does not read"
    gateway = config.load({}, flux)
    assert gateway.host == "0.0.0.0"
    assert gateway.gateway_port == config.Settings.gateway_port == 8080  # Flux-KV's
    assert published(spec) == {("127.0.0.1", 8080, 8080)}
    assert not gateway.gateway_nodes  # from etcd, where the nodes register
    env = environment(spec)
    for name in NODES:
        node_env = environment(s[name])
        node = config.load({}, flux_variables(s[name]))
        assert gateway.etcd_endpoints == node.etcd_endpoints and gateway.etcd_prefix == node.etcd_prefix
        assert (gateway.otlp_endpoint, gateway.trace_sample_ratio) == (node.otlp_endpoint, node.trace_sample_ratio)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == node_env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
    assert native_stack.stop_grace_s(spec) > gateway.shutdown_grace_s


@contextmanager
def health_server(status: HTTPStatus) -> Iterator[int]:
    """An HTTP server on a free port of 127.0.0.1 that answers GET /health with `status`; yields the port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/health" else HTTPStatus.NOT_FOUND)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Handler) as server:
        thread = threading.Thread(target=server.serve_forever)
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            thread.join()


def test_the_gateways_health_check_passes_only_on_a_200_from_health() -> None:
    test = services()[GATEWAY]["healthcheck"]["test"]
    argv = [sys.executable if word == "python" else word for word in test[1:]]  # as native_stack.py runs it

    def check(port: int) -> int:
        env = {**os.environ, "FLUX_GATEWAY_PORT": str(port)}
        return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode

    with health_server(HTTPStatus.OK) as port:
        assert check(port) == 0
    assert check(port) != 0  # closed now
    with health_server(HTTPStatus.SERVICE_UNAVAILABLE) as port:
        assert check(port) != 0


def test_credentials_come_from_an_env_file_that_is_not_committed() -> None:
    text = COMPOSE_FILE.read_text()
    references = re.findall(r"\$\{?(\w+)(:?[?-]?)", text)
    assert references
    assert {name for name, _ in references} <= set(EXAMPLE), "variables missing from deploy/.env.example"
    ops = {name: op for name, op in references}
    assert {ops["RABBITMQ_USER"], ops["RABBITMQ_PASSWORD"]} == {":?"}, "credentials are required: ${VAR:?message}"
    assert {op for name, op in ops.items() if not name.startswith("RABBITMQ_")} <= {":-"}, "the rest have defaults"
    s = services()
    assert s["rabbitmq"]["environment"] == {
        "RABBITMQ_DEFAULT_USER": EXAMPLE["RABBITMQ_USER"],
        "RABBITMQ_DEFAULT_PASS": EXAMPLE["RABBITMQ_PASSWORD"],
    }
    url = config.load({}, flux_variables(s["fluxkv-1"])).rabbitmq_url
    assert url == f"amqp://{EXAMPLE['RABBITMQ_USER']}:{EXAMPLE['RABBITMQ_PASSWORD']}@rabbitmq:5672/"
    ignored = subprocess.run(
        ["git", "-C", str(ROOT), "check-ignore", "deploy/.env", "deploy/.env.example"], capture_output=True, text=True
    )
    assert ignored.stdout.split() == ["deploy/.env"]


def test_a_missing_env_file_fails_clearly() -> None:
    with pytest.raises(native_stack.StackError, match=r"required variable RABBITMQ_\w+ is missing a value: set it in"):
        native_stack.load_compose(COMPOSE_FILE, {})


def test_the_dockerfile_builds_a_wheel_and_runs_it_as_a_user_with_a_health_check() -> None:
    stages = native_stack.dockerfile_stages(ROOT / "Dockerfile")
    assert len(stages) >= 2
    froms = [stage[0][1] for stage in stages]
    assert froms[0] == "python:3.11-slim AS builder"
    assert froms[-1] == "python:3.11-slim"
    builder, runtime = stages[0], stages[-1]
    assert any(i == "RUN" and "pip wheel" in a for i, a in builder)
    runs = " ".join(a for i, a in runtime if i == "RUN")
    assert "pip install --no-cache-dir" in runs and "--mount=type=bind,from=builder" in runs
    assert not re.search(r"\b(gcc|build-essential|apt-get)\b", runs)
    assert "install -d -o fluxkv -g fluxkv" in runs and "/data" in runs
    instructions = [i for i, _ in runtime]
    users = [a for i, a in runtime if i == "USER"]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith(("root:", "0:"))
    assert instructions.index("USER") < instructions.index("ENTRYPOINT")
    assert IMAGE.entrypoint == ["fluxkv-server"]
    assert IMAGE.healthcheck == ["python", "-m", "fluxkv.server.healthcheck"]
    assert not [k for k in IMAGE.env if k.startswith("FLUX_")]  # fluxkv-cdc runs from this image too
    exposed = {int(p) for i, a in runtime if i == "EXPOSE" for p in a.split()}
    assert exposed == {config.Settings.port, setting("FLUX_ADMIN_PORT").default, config.Settings.gateway_port}


def test_the_build_context_is_only_what_the_image_needs() -> None:
    lines = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*"  # everything else is left out: .git, .venv, deploy/.env
    assert {"!pyproject.toml", "!README.md", "!fluxkv/"} <= set(lines)
