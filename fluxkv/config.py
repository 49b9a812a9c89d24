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
    node_id: str = ""
    max_key_bytes: int = 4 * KIB
    max_value_bytes: int = 1 * MIB
    max_batch_items: int = 1000
    max_batch_bytes: int = 8 * MIB
    max_message_bytes: int = 16 * MIB
    expire_interval_ms: int = 100
    expire_batch: int = 2000
    shutdown_grace_s: float = 10.0
    log_level: str = "info"


@dataclass(frozen=True)
class Setting:
    field: str
    env: str
    doc: str
    parse: Callable[[str], Any]

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")

    @property
    def default(self) -> Any:
        return _DEFAULTS[self.field]


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


def _float(lo: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if not value >= lo:  # also rejects NaN
            raise ValueError(f"expected a number of at least {lo}, got {text}")
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


def _host(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("expected a host name or IP address, got an empty value")
    return value


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "FLUX_SERVER_HOST", "Address to listen on; 0.0.0.0 to accept connections from other hosts.", _host),
    Setting("port", "FLUX_SERVER_PORT", "gRPC port to listen on; 0 picks a free port.", _int(0, 65535)),
    Setting(
        "node_id", "FLUX_NODE_ID", "This node's id in Info and change records; empty means <hostname>:<port>.", _text
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
        if raw is None:
            continue
        try:
            values[s.field] = s.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"invalid {source}: {exc}") from None
    settings = Settings(**values)
    _check_consistent(settings)
    return settings


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """FLUX_* variables that no setting reads (typos, or features not built yet)."""
    known = {s.env for s in SETTINGS}
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


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str], parser: argparse.ArgumentParser) -> Settings:
    """Parse the command line with `parser` (which has add_arguments) into Settings."""
    args = parser.parse_args(argv)
    try:
        return load(vars(args), environ)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
