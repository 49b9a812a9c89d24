"""Settings: precedence, validation messages, and the README table."""

from __future__ import annotations

import re

import pytest

from fluxkv import config
from tests.conftest import ROOT


def test_defaults_run_standalone_on_loopback() -> None:
    s = config.load({}, {})
    assert (s.host, s.port) == ("127.0.0.1", 50052)
    assert s == config.Settings()


def test_flags_override_environment_override_defaults() -> None:
    env = {"FLUX_SERVER_PORT": "6000", "FLUX_SERVER_HOST": "0.0.0.0"}
    s = config.load({"port": "7000", "host": None}, env)
    assert s.port == 7000  # flag
    assert s.host == "0.0.0.0"  # environment
    assert s.max_key_bytes == 4096  # default


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({"port": "-1"}, {}, "invalid --port: expected an integer from 0 to 65535, got -1"),
        ({}, {"FLUX_SERVER_HOST": " "}, "invalid FLUX_SERVER_HOST: expected a host name or IP address"),
        ({}, {"FLUX_SHUTDOWN_GRACE_S": "nan"}, "invalid FLUX_SHUTDOWN_GRACE_S: expected a number of at least 0.0"),
        ({}, {"FLUX_EXPIRE_BATCH": "1.5"}, "invalid FLUX_EXPIRE_BATCH: expected an integer, got '1.5'"),
        (
            {},
            {"FLUX_MAX_BATCH_BYTES": "1000"},
            "FLUX_MAX_BATCH_BYTES (1000) must be at least FLUX_MAX_KEY_BYTES + FLUX_MAX_VALUE_BYTES (1052672)",
        ),
    ],
)
def test_invalid_values_name_the_setting(flags: dict[str, str], env: dict[str, str], message: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.load(flags, env)
    assert message in str(info.value)


def test_unknown_flux_variables_are_listed() -> None:
    env = {"FLUX_SERVER_PORT": "1", "FLUX_SERVR_PORT": "2", "FLUX_CDC_PREFETCH": "10", "HOME": "/root"}
    assert config.unknown_variables(env) == ["FLUX_SERVR_PORT"]


def test_readme_configuration_table_lists_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(FLUX_\w+)` \| `(--[\w-]+)` \| `([^`]*)` \| (.+?) \|$", readme, re.MULTILINE)
    assert rows == [(s.env, s.flag, s.shown_default, s.doc) for s in config.SETTINGS]
