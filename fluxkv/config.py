"""The node's settings: one typed object, read from flags, then FLUX_* environment
variables, then defaults (in that order of precedence).

Every setting is declared once in SETTINGS with its environment variable, its
flag, its default and one line of documentation; the README's configuration
table lists the same rows (a test keeps them equal).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("fluxkv.config")

KIB = 1024
MIB = 1024 * KIB


class ConfigError(ValueError):
    """A setting has a value the node cannot run with; the message names it."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 50052
    grpc_server: str = "native"
    event_loop: str = "auto"
    node_id: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    tls_ca_file: str = ""
    auth_tokens_file: str = ""
    max_key_bytes: int = 4 * KIB
    max_value_bytes: int = 1 * MIB
    max_batch_items: int = 1000
    max_batch_bytes: int = 8 * MIB
    max_message_bytes: int = 16 * MIB
    expire_interval_ms: int = 100
    expire_batch: int = 2000
    shutdown_grace_s: float = 10.0
    log_level: str = "info"
    rabbitmq_url: str = ""
    rabbitmq_ca_file: str = ""
    rabbitmq_cert_file: str = ""
    rabbitmq_key_file: str = ""
    cdc_exchange: str = "flux_kv_events"
    cdc_exchange_type: str = "fanout"
    cdc_queue: str = "flux_cdc_file_logger"
    cdc_format: str = "fluxkv"
    cdc_queue_events: int = 100_000
    cdc_queue_bytes: int = 256 * MIB
    cdc_full_policy: str = "block"
    cdc_block_timeout_ms: int = 5000
    cdc_batch_bytes: int = 64 * KIB
    cdc_linger_ms: int = 50
    cdc_max_in_flight: int = 8
    cdc_flush_timeout_s: float = 10.0
    watch_history: int = 10_000
    watch_history_bytes: int = 64 * MIB
    etcd_endpoints: tuple[str, ...] = ()
    etcd_ca_file: str = ""
    etcd_cert_file: str = ""
    etcd_key_file: str = ""
    etcd_username: str = ""
    etcd_password: str = dataclasses.field(default="", repr=False)  # never in a repr, so never in a log
    etcd_prefix: str = "/services/kv-service/"
    etcd_lease_ttl_s: int = 5
    etcd_timeout_s: float = 5.0
    etcd_at_start: str = "retry"
    pod_ip: str = ""
    ring_vnodes: int = 160
    workers: int = 1
    pprof_enabled: bool = False
    admin_port: int | None = 6060  # None: off
    log_format: str = "console"
    otlp_endpoint: str = ""
    trace_sample_ratio: float = 0.1
    aof_filename: str = ""
    aof_append_fsync: str = "everysec"
    aof_rewrite_percent: int = 100
    aof_rewrite_min_bytes: int = 64 * MIB
    aof_buffer_bytes: int = 64 * MIB
    gateway_port: int = 8080
    gateway_nodes: tuple[str, ...] = ()
    gateway_timeout_s: float = 5.0
    gateway_max_body_bytes: int = 16 * MIB
    gateway_rate_limit: float = 1000.0
    gateway_rate_burst: int = 2000
    gateway_breaker_min_requests: int = 10
    gateway_breaker_failure_ratio: float = 0.5
    gateway_breaker_window_s: float = 10.0
    gateway_breaker_open_s: float = 5.0
    gateway_max_in_flight: int = 100
    gateway_access_log: bool = False


@dataclass(frozen=True)
class Setting:
    field: str
    env: str
    doc: str
    parse: Callable[[str], Any]
    # Older names of the variable, read when `env` is not set (say, Flux-KV's).
    aliases: tuple[str, ...] = ()

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def default(self) -> Any:
        return _DEFAULTS[self.field]

    @property
    def shown_default(self) -> str:
        """The default as a variable's value, as the README's table shows it."""
        return self.as_variable(self.default) or '""'

    @staticmethod
    def as_variable(value: Any) -> str:
        """A value of the setting as its variable's text, which parses back to it."""
        if value is None:
            return "off"
        if isinstance(value, bool):
            return str(value).lower()
        return ",".join(value) if isinstance(value, tuple) else str(value)


def _int(lo: int, hi: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
            raise ValueError(f"expected an integer {bound}, got {value}")
        return value

    return parse


def _float(lo: float, hi: float | None = None) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if not value >= lo:  # also rejects NaN
            raise ValueError(f"expected a number of at least {lo}, got {text}")
        if hi is not None and value > hi:
            raise ValueError(f"expected a number from {lo} to {hi}, got {text}")
        return value

    return parse


def _choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {text!r}")
        return value

    return parse


def _text(text: str) -> str:
    return text.strip()


def _endpoints(text: str) -> tuple[str, ...]:
    return tuple(e.strip() for e in text.split(",") if e.strip())


def _prefix(text: str) -> str:
    value = text.strip()
    if not value.startswith("/") or not value.endswith("/"):
        raise ValueError(f"expected a key prefix that starts and ends with '/', got {text!r}")
    return value


def _workers(text: str) -> int:
    if text.strip().lower() == "auto":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return _int(1, 256)(text)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true or false (also 1/0, yes/no, on/off), got {text!r}")


def _port_or_off(text: str) -> int | None:
    if text.strip().lower() == "off":
        return None
    try:
        return _int(0, 65535)(text)
    except ValueError:
        raise ValueError(f"expected a port from 0 to 65535 or off, got {text!r}") from None


def _host(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("expected a host name or IP address, got an empty value")
    return value


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "FLUX_SERVER_HOST", "Address to listen on; 0.0.0.0 to accept connections from other hosts.", _host),
    Setting("port", "FLUX_SERVER_PORT", "gRPC port to listen on; 0 picks a free port.", _int(0, 65535)),
    Setting(
        "grpc_server",
        "FLUX_GRPC_SERVER",
        "gRPC server: native (pygrpc-native: HTTP/2 in Rust, handlers in Python) or grpcio (grpc.aio).",
        _choice("native", "grpcio"),
    ),
    Setting(
        "event_loop",
        "FLUX_EVENT_LOOP",
        "Event loop: auto (uvloop's under grpcio, where it measurably helps; asyncio's under native), asyncio or "
        "uvloop.",
        _choice("auto", "asyncio", "uvloop"),
    ),
    Setting(
        "node_id", "FLUX_NODE_ID", "This node's id in Info and change records; empty means <hostname>:<port>.", _text
    ),
    Setting(
        "tls_cert_file",
        "FLUX_TLS_CERT_FILE",
        "PEM certificate (a chain allowed) the gRPC and admin ports serve TLS with, together with FLUX_TLS_KEY_FILE; "
        "empty serves plaintext. A TLS node serves on grpcio (pygrpc-native has no TLS).",
        _text,
    ),
    Setting("tls_key_file", "FLUX_TLS_KEY_FILE", "PEM private key of FLUX_TLS_CERT_FILE.", _text),
    Setting(
        "tls_client_ca_file",
        "FLUX_TLS_CLIENT_CA_FILE",
        "PEM CA certificates: with TLS on, a client must present a certificate signed by one of them (mutual TLS); "
        "empty asks for none.",
        _text,
    ),
    Setting(
        "tls_ca_file",
        "FLUX_TLS_CA_FILE",
        "PEM CA certificates a node verifies other nodes' certificates with when it forwards a call (the CA that "
        "the nodes' clients use); empty: the system's.",
        _text,
    ),
    Setting(
        "auth_tokens_file",
        "FLUX_AUTH_TOKENS_FILE",
        "TOML file of the tokens callers may send, each with a role and key prefixes (docs/security.md); SIGHUP "
        "reloads it. Empty: no token needed.",
        _text,
    ),
    Setting("max_key_bytes", "FLUX_MAX_KEY_BYTES", "Largest key accepted, in UTF-8 bytes.", _int(1)),
    Setting("max_value_bytes", "FLUX_MAX_VALUE_BYTES", "Largest value accepted, in bytes.", _int(0)),
    Setting("max_batch_items", "FLUX_MAX_BATCH_ITEMS", "Most keys in one MultiGet, MultiSet or Scan page.", _int(1)),
    Setting(
        "max_batch_bytes",
        "FLUX_MAX_BATCH_BYTES",
        "Most key and value bytes in one MultiSet, MultiGet answer or Scan page.",
        _int(1),
    ),
    Setting(
        "max_message_bytes",
        "FLUX_MAX_MESSAGE_BYTES",
        "Largest gRPC message received or sent; larger ones fail with RESOURCE_EXHAUSTED.",
        _int(1),
    ),
    Setting(
        "expire_interval_ms", "FLUX_EXPIRE_INTERVAL_MS", "Pause between active expiry cycles, in milliseconds.", _int(1)
    ),
    Setting(
        "expire_batch",
        "FLUX_EXPIRE_BATCH",
        "Most TTL entries one expiry cycle examines before yielding to requests.",
        _int(1),
    ),
    Setting(
        "shutdown_grace_s",
        "FLUX_SHUTDOWN_GRACE_S",
        "Seconds in-flight calls get to finish after SIGTERM or SIGINT.",
        _float(0.0),
    ),
    Setting(
        "log_level",
        "FLUX_LOG_LEVEL",
        "Log level: debug, info, warning or error.",
        _choice("debug", "info", "warning", "error"),
    ),
    Setting(
        "rabbitmq_url",
        "FLUX_RABBITMQ_URL",
        "AMQP URL of the broker that receives change events, e.g. amqp://guest:guest@127.0.0.1:5672/ (amqps:// for TLS); empty turns CDC off.",
        _text,
    ),
    Setting(
        "rabbitmq_ca_file",
        "FLUX_RABBITMQ_CA_FILE",
        "PEM CA certificates an amqps:// broker's certificate is verified with; empty: the system's.",
        _text,
    ),
    Setting(
        "rabbitmq_cert_file",
        "FLUX_RABBITMQ_CERT_FILE",
        "PEM client certificate for an amqps:// broker that asks for one, with FLUX_RABBITMQ_KEY_FILE.",
        _text,
    ),
    Setting("rabbitmq_key_file", "FLUX_RABBITMQ_KEY_FILE", "PEM private key of FLUX_RABBITMQ_CERT_FILE.", _text),
    Setting("cdc_exchange", "FLUX_CDC_EXCHANGE", "Exchange the events are published to (declared durable).", _host),
    Setting(
        "cdc_exchange_type",
        "FLUX_CDC_EXCHANGE_TYPE",
        "Type of that exchange: fanout, topic, direct or headers. The routing key is the node id.",
        _choice("fanout", "topic", "direct", "headers"),
    ),
    Setting(
        "cdc_queue",
        "FLUX_CDC_QUEUE",
        "Durable queue the node declares and binds to the exchange, so that events published before any consumer "
        "starts are kept; empty declares none.",
        _text,
    ),
    Setting(
        "cdc_format",
        "FLUX_CDC_FORMAT",
        "Message bodies: fluxkv (a JSON array of version-1 events per message) or flux-kv (one message per change, "
        "Flux-KV's {type, key, value} object, for Flux-KV's consumers; see docs/cdc.md).",
        _choice("fluxkv", "flux-kv"),
    ),
    Setting(
        "cdc_queue_events",
        "FLUX_CDC_QUEUE_EVENTS",
        "Most events held in memory between a write and the broker's confirm.",
        _int(1),
    ),
    Setting(
        "cdc_queue_bytes",
        "FLUX_CDC_QUEUE_BYTES",
        "Most key and value bytes held in memory between a write and the broker's confirm.",
        _int(1),
    ),
    Setting(
        "cdc_full_policy",
        "FLUX_CDC_FULL_POLICY",
        "When the CDC queue is full: block (writes wait for room, then fail with UNAVAILABLE) or drop (writes "
        "succeed, their events are dropped and counted). With FLUX_AOF_FILENAME set, neither: the events the queue "
        "cannot hold are read back from the append-only file (spill).",
        _choice("block", "drop"),
    ),
    Setting(
        "cdc_block_timeout_ms",
        "FLUX_CDC_BLOCK_TIMEOUT_MS",
        "With block: longest a write waits for room, in milliseconds (less when the call's deadline is nearer).",
        _int(0),
    ),
    Setting(
        "cdc_batch_bytes",
        "FLUX_CDC_BATCH_BYTES",
        "A batch (one message, or with flux-kv one message per event) carries events up to this many bytes of "
        "JSON (a larger event travels alone).",
        _int(1),
    ),
    Setting(
        "cdc_linger_ms",
        "FLUX_CDC_LINGER_MS",
        "Least time between two batches while they are not full, in milliseconds (an event after a quiet interval "
        "leaves at once).",
        _int(0),
    ),
    Setting(
        "cdc_max_in_flight",
        "FLUX_CDC_MAX_IN_FLIGHT",
        "Batches published and not yet confirmed at once (a batch is one message, or with flux-kv one message per "
        "event).",
        _int(1),
    ),
    Setting(
        "cdc_flush_timeout_s",
        "FLUX_CDC_FLUSH_TIMEOUT_S",
        "At shutdown, seconds the publisher gets to publish and confirm every queued event.",
        _float(0.0),
    ),
    Setting(
        "watch_history",
        "FLUX_WATCH_HISTORY",
        "Most recent changes kept in memory for Watch to start from.",
        _int(1),
    ),
    Setting(
        "watch_history_bytes",
        "FLUX_WATCH_HISTORY_BYTES",
        "Most key and value bytes of those changes.",
        _int(1),
    ),
    Setting(
        "etcd_endpoints",
        "FLUX_ETCD_ENDPOINTS",
        "Comma-separated etcd endpoints (host:port, http://host:port or https://host:port) to register this node in; empty runs the node on its own.",
        _endpoints,
    ),
    Setting(
        "etcd_ca_file",
        "FLUX_ETCD_CA_FILE",
        "PEM CA certificates that etcd's certificate is verified with; setting it (or a client certificate) talks "
        "TLS to etcd.",
        _text,
    ),
    Setting(
        "etcd_cert_file",
        "FLUX_ETCD_CERT_FILE",
        "PEM client certificate for an etcd that asks for one, with FLUX_ETCD_KEY_FILE.",
        _text,
    ),
    Setting("etcd_key_file", "FLUX_ETCD_KEY_FILE", "PEM private key of FLUX_ETCD_CERT_FILE.", _text),
    Setting(
        "etcd_username",
        "FLUX_ETCD_USERNAME",
        "User to authenticate to etcd as (etcd's auth), with FLUX_ETCD_PASSWORD; empty: no etcd auth.",
        _text,
    ),
    Setting("etcd_password", "FLUX_ETCD_PASSWORD", "Password of FLUX_ETCD_USERNAME.", lambda text: text),
    Setting(
        "etcd_prefix",
        "FLUX_ETCD_PREFIX",
        "etcd key prefix the nodes register under, as <prefix><address> with the address as value.",
        _prefix,
    ),
    Setting(
        "etcd_lease_ttl_s",
        "FLUX_ETCD_LEASE_TTL_S",
        "TTL of the registration's lease in seconds: a node that stops renewing it leaves the ring this much later.",
        _int(2, 3600),
    ),
    Setting("etcd_timeout_s", "FLUX_ETCD_TIMEOUT_S", "Deadline of each call to etcd, in seconds.", _float(0.1)),
    Setting(
        "etcd_at_start",
        "FLUX_ETCD_AT_START",
        "When etcd cannot be reached at start-up: retry (serve and keep trying to register, saying so) or fail "
        "(exit 1 with the reason).",
        _choice("retry", "fail"),
    ),
    Setting(
        "pod_ip",
        "FLUX_POD_IP",
        "Address other hosts reach this node at; the node registers <this>:<port>. Empty: the listen address, or "
        "this host's outbound IP when listening on 0.0.0.0.",
        _text,
    ),
    Setting(
        "ring_vnodes",
        "FLUX_RING_VNODES",
        "Virtual nodes per node on the consistent-hash ring (clients and nodes must agree).",
        _int(1, 4096),
    ),
    Setting(
        "workers",
        "FLUX_WORKERS",
        "Worker processes, each an independent node on its own port (port, port+1, ...); auto: one per core.",
        _workers,
    ),
    Setting(
        "pprof_enabled",
        "FLUX_PPROF_ENABLED",
        "Serve CPU profiles of the node (py-spy) on the admin port, at /debug/pprof/, as Flux-KV's pprof.",
        _bool,
    ),
    Setting(
        "admin_port",
        "FLUX_ADMIN_PORT",
        "HTTP port on FLUX_SERVER_HOST for /metrics, /healthz, /readyz and /debug/pprof/; 0 picks a free port, off "
        "serves none. Worker i listens on this port + i. Flux-KV's FLUX_PPROF_PORT is read when this is not set.",
        _port_or_off,
        aliases=("FLUX_PPROF_PORT",),
    ),
    Setting(
        "log_format",
        "FLUX_LOG_FORMAT",
        "Log lines: console (text for people) or json (one object per line: ts, level, logger, msg, event...). "
        "fluxkv-cdc reads it too.",
        _choice("console", "json"),
    ),
    Setting(
        "otlp_endpoint",
        "FLUX_JAEGER_ENDPOINT",
        "OTLP/gRPC endpoint spans are exported to, e.g. jaeger:4317 (plaintext unless https://). Empty: "
        "OTEL_EXPORTER_OTLP_ENDPOINT's, and with neither, tracing is off.",
        _text,
    ),
    Setting(
        "trace_sample_ratio",
        "FLUX_TRACE_SAMPLE_RATIO",
        "Share of calls traced when the caller did not decide, from 0 to 1; a caller's sampled (or not) trace is "
        "followed.",
        _float(0.0, 1.0),
    ),
    Setting(
        "aof_filename",
        "FLUX_AOF_FILENAME",
        "Path of the append-only file that persists every change and is replayed at start; empty keeps nothing "
        "on disk. Worker i uses <path>.<i>.",
        _text,
    ),
    Setting(
        "aof_append_fsync",
        "FLUX_AOF_APPEND_FSYNC",
        "When the file is fsynced: always (a write is acknowledged once on disk), everysec (at most a second of "
        "acknowledged writes is lost in a machine crash) or no (left to the OS).",
        _choice("always", "everysec", "no"),
    ),
    Setting(
        "aof_rewrite_percent",
        "FLUX_AOF_REWRITE_PERCENT",
        "Rewrite (compact) the file in the background once it has grown this many percent past its size after "
        "the last rewrite; 0 only on demand (fluxkv rewrite-aof).",
        _int(0),
    ),
    Setting(
        "aof_rewrite_min_bytes",
        "FLUX_AOF_REWRITE_MIN_BYTES",
        "No automatic rewrite while the file is smaller than this.",
        _int(0),
    ),
    Setting(
        "aof_buffer_bytes",
        "FLUX_AOF_BUFFER_BYTES",
        "With everysec or no: most key and value bytes of changes waiting for the file's writer; past it, writes "
        "wait until it catches up.",
        _int(1),
    ),
    Setting(
        "gateway_port",
        "FLUX_GATEWAY_PORT",
        "fluxkv-gateway: HTTP port on FLUX_SERVER_HOST for the JSON API, /health, /metrics and /openapi.json; 0 "
        "picks a free port.",
        _int(0, 65535),
    ),
    Setting(
        "gateway_nodes",
        "FLUX_GATEWAY_NODES",
        "fluxkv-gateway: the nodes' gRPC addresses (host:port, comma-separated); empty finds them in etcd "
        "(FLUX_ETCD_ENDPOINTS).",
        _endpoints,
    ),
    Setting(
        "gateway_timeout_s",
        "FLUX_GATEWAY_TIMEOUT_S",
        "fluxkv-gateway: deadline of each request's calls to the nodes, retries included, in seconds (504 past it).",
        _float(0.001),
    ),
    Setting(
        "gateway_max_body_bytes",
        "FLUX_GATEWAY_MAX_BODY_BYTES",
        "fluxkv-gateway: largest request body accepted, in bytes (413 over it).",
        _int(1),
    ),
    Setting(
        "gateway_rate_limit",
        "FLUX_GATEWAY_RATE_LIMIT",
        "fluxkv-gateway: API requests a second, for all callers together (429 over it); 0 sets no limit.",
        _float(0),
    ),
    Setting(
        "gateway_rate_burst",
        "FLUX_GATEWAY_RATE_BURST",
        "fluxkv-gateway: API requests allowed at once above FLUX_GATEWAY_RATE_LIMIT (the token bucket's size).",
        _int(1),
    ),
    Setting(
        "gateway_breaker_min_requests",
        "FLUX_GATEWAY_BREAKER_MIN_REQUESTS",
        "fluxkv-gateway: requests the circuit breaker must see in its window before it may open.",
        _int(1),
    ),
    Setting(
        "gateway_breaker_failure_ratio",
        "FLUX_GATEWAY_BREAKER_FAILURE_RATIO",
        "fluxkv-gateway: share of failed requests in the window (5xx: a node unavailable or past its deadline) "
        "that opens the breaker.",
        _float(0.001, 1.0),
    ),
    Setting(
        "gateway_breaker_window_s",
        "FLUX_GATEWAY_BREAKER_WINDOW_S",
        "fluxkv-gateway: the circuit breaker's rolling window, in seconds.",
        _float(0.01),
    ),
    Setting(
        "gateway_breaker_open_s",
        "FLUX_GATEWAY_BREAKER_OPEN_S",
        "fluxkv-gateway: how long an open breaker answers 503 before it lets one trial request through.",
        _float(0),
    ),
    Setting(
        "gateway_max_in_flight",
        "FLUX_GATEWAY_MAX_IN_FLIGHT",
        "fluxkv-gateway: API requests in flight at most (not counting open watches); 503 over it.",
        _int(1),
    ),
    Setting(
        "gateway_access_log",
        "FLUX_GATEWAY_ACCESS_LOG",
        "fluxkv-gateway: log one line per request (JSON with FLUX_LOG_FORMAT=json): true (or on) or false.",
        _bool,
    ),
)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings)}
assert [s.field for s in SETTINGS] == list(_DEFAULTS), "SETTINGS must follow Settings' fields"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; each defaults to None (not given)."""
    for s in SETTINGS:
        parser.add_argument(s.flag, dest=s.field, metavar=s.field.split("_")[-1].upper(), help=f"{s.doc} [{s.env}]")


def load(flags: Mapping[str, str | None], environ: Mapping[str, str]) -> Settings:
    """Build Settings from parsed flags (None = not given) and an environment."""
    values: dict[str, Any] = {}
    for s in SETTINGS:
        given = flags.get(s.field)
        source, raw = (s.flag, given) if given is not None else (s.env, environ.get(s.env))
        for alias in s.aliases:
            if raw is None:
                source, raw = alias, environ.get(alias)
        if raw is None:
            continue
        try:
            values[s.field] = s.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"invalid {source}: {exc}") from None
    settings = Settings(**values)
    _check_consistent(settings)
    _check_cdc(settings)
    _check_security(settings)
    if settings.pprof_enabled and settings.admin_port is None:
        raise ConfigError("FLUX_PPROF_ENABLED serves profiles on the admin port, but FLUX_ADMIN_PORT is off")
    return settings


# Variables that only other FluxKV programs read, so a node given the same
# environment (as in deploy/) does not call them unknown.
OTHER_PROGRAMS_VARIABLES = {"FLUX_CDC_PREFETCH": "fluxkv-cdc"}


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """FLUX_* variables that no setting reads (typos, or features not built yet)."""
    known = {name for s in SETTINGS for name in (s.env, *s.aliases)} | set(OTHER_PROGRAMS_VARIABLES)
    return sorted(k for k in environ if k.startswith("FLUX_") and k not in known)


def _check_consistent(s: Settings) -> None:
    largest_item = s.max_key_bytes + s.max_value_bytes
    if s.max_batch_bytes < largest_item:
        raise ConfigError(
            f"FLUX_MAX_BATCH_BYTES ({s.max_batch_bytes}) must be at least FLUX_MAX_KEY_BYTES + "
            f"FLUX_MAX_VALUE_BYTES ({largest_item}) so that one item of the largest size fits a batch"
        )
    # Room for protobuf framing around a full batch.
    needed = s.max_batch_bytes + s.max_batch_items * 32 + 64 * KIB
    if s.max_message_bytes < needed:
        raise ConfigError(
            f"FLUX_MAX_MESSAGE_BYTES ({s.max_message_bytes}) must be at least {needed} to carry a full batch "
            f"(FLUX_MAX_BATCH_BYTES {s.max_batch_bytes} plus framing for FLUX_MAX_BATCH_ITEMS {s.max_batch_items})"
        )


def _check_cdc(s: Settings) -> None:
    if s.cdc_queue_events < s.max_batch_items:
        raise ConfigError(
            f"FLUX_CDC_QUEUE_EVENTS ({s.cdc_queue_events}) must be at least FLUX_MAX_BATCH_ITEMS "
            f"({s.max_batch_items}) so that the events of one MultiSet fit the queue"
        )
    if s.cdc_queue_bytes < s.max_batch_bytes:
        raise ConfigError(
            f"FLUX_CDC_QUEUE_BYTES ({s.cdc_queue_bytes}) must be at least FLUX_MAX_BATCH_BYTES "
            f"({s.max_batch_bytes}) so that the events of one MultiSet fit the queue"
        )
    if s.rabbitmq_url and not s.rabbitmq_url.startswith(("amqp://", "amqps://")):
        raise ConfigError(f"FLUX_RABBITMQ_URL must start with amqp:// or amqps://, got {redact_url(s.rabbitmq_url)!r}")


def _check_security(s: Settings) -> None:
    """The files the TLS and token settings name exist, can be read and hold what they should, so that a
    node with a bad one exits at start-up rather than at its first connection."""
    _check_key_pair(s.tls_cert_file, s.tls_key_file, "FLUX_TLS_CERT_FILE", "FLUX_TLS_KEY_FILE")
    _check_key_pair(s.etcd_cert_file, s.etcd_key_file, "FLUX_ETCD_CERT_FILE", "FLUX_ETCD_KEY_FILE")
    if s.tls_client_ca_file and not s.tls_cert_file:
        raise ConfigError(
            "FLUX_TLS_CLIENT_CA_FILE asks clients for certificates over TLS, but FLUX_TLS_CERT_FILE is not set"
        )
    for path, name in (
        (s.tls_client_ca_file, "FLUX_TLS_CLIENT_CA_FILE"),
        (s.tls_ca_file, "FLUX_TLS_CA_FILE"),
        (s.etcd_ca_file, "FLUX_ETCD_CA_FILE"),
    ):
        if path:
            _check_ca(path, name)
    check_rabbitmq_tls(s.rabbitmq_url, s.rabbitmq_ca_file, s.rabbitmq_cert_file, s.rabbitmq_key_file)
    if s.auth_tokens_file:
        _check_readable(s.auth_tokens_file, "FLUX_AUTH_TOKENS_FILE")
    if bool(s.etcd_username) != bool(s.etcd_password):
        raise ConfigError("FLUX_ETCD_USERNAME and FLUX_ETCD_PASSWORD go together: set both or neither")
    plain = [e for e in s.etcd_endpoints if e.startswith("http://")]
    if plain and (s.etcd_ca_file or s.etcd_cert_file or any(e.startswith("https://") for e in s.etcd_endpoints)):
        raise ConfigError(
            f"FLUX_ETCD_ENDPOINTS names plain-text endpoints ({', '.join(plain)}) but TLS to etcd is asked for "
            "(FLUX_ETCD_CA_FILE, FLUX_ETCD_CERT_FILE or an https:// endpoint): use https:// or host:port"
        )


def load_etcd_access(environ: Mapping[str, str]) -> Settings:
    """Settings with only how to reach etcd, FLUX_ETCD_CA_FILE, _CERT_FILE, _KEY_FILE, _USERNAME and _PASSWORD,
    read from `environ` and checked as a node checks them (ConfigError), for the programs that find the nodes in
    etcd without being one: the CLI and fluxkv-bench."""
    fields = ("etcd_ca_file", "etcd_cert_file", "etcd_key_file", "etcd_username", "etcd_password")
    values: dict[str, Any] = {}
    for s in SETTINGS:
        if s.field in fields and (raw := environ.get(s.env)) is not None:
            try:
                values[s.field] = s.parse(raw)
            except ValueError as exc:
                raise ConfigError(f"invalid {s.env}: {exc}") from None
    settings = Settings(**values)
    _check_security(settings)  # the other settings keep their defaults (none), so only etcd's are checked
    return settings


RABBITMQ_TLS_SETTINGS = ("FLUX_RABBITMQ_CA_FILE", "FLUX_RABBITMQ_CERT_FILE", "FLUX_RABBITMQ_KEY_FILE")


def check_rabbitmq_tls(
    url: str, ca_file: str, cert_file: str, key_file: str, names: tuple[str, str, str] = RABBITMQ_TLS_SETTINGS
) -> None:
    """The broker's TLS files (named `names` in messages) hold what they should, and are given only with an
    amqps:// URL: with amqp:// they would go unused and the changes travel in plaintext, so that is refused."""
    ca_name, cert_name, key_name = names
    if url.startswith("amqp://"):
        for path, name in ((ca_file, ca_name), (cert_file, cert_name), (key_file, key_name)):
            if path:
                raise ConfigError(
                    f"{name} is for a TLS broker, but the URL {redact_url(url)} is plaintext: use amqps:// "
                    f"(the broker's TLS port) or unset {name}"
                )
    _check_key_pair(cert_file, key_file, cert_name, key_name)
    if ca_file:
        _check_ca(ca_file, ca_name)


def _check_readable(path: str, name: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ConfigError(f"invalid {name}: cannot read {path}: {exc.strerror}") from None


def _check_key_pair(cert: str, key: str, cert_name: str, key_name: str) -> None:
    if not cert and not key:
        return
    if not cert or not key:
        raise ConfigError(f"{cert_name} and {key_name} go together: set both or neither")
    _check_readable(cert, cert_name)
    _check_readable(key, key_name)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise ConfigError(f"{key_name} ({key}) is not the key of the certificate in {cert_name} ({cert})") from None
        raise ConfigError(f"invalid {cert_name} or {key_name}: not a PEM certificate and its key: {exc}") from None


def _check_ca(path: str, name: str) -> None:
    _check_readable(path, name)
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:
        raise ConfigError(f"invalid {name}: {path} holds no PEM CA certificate: {exc}") from None


def redact_url(url: str) -> str:
    """`url` without the password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str], parser: argparse.ArgumentParser) -> Settings:
    """Parse the command line with `parser` (which has add_arguments) into Settings."""
    args = parser.parse_args(argv)
    try:
        return load(vars(args), environ)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
