"""Settings: precedence, validation messages, and the README table."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from fluxkv import config
from tests.conftest import ROOT, Certificates


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


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FLUX_TLS_CERT_FILE": "{cert}"}, "FLUX_TLS_CERT_FILE and FLUX_TLS_KEY_FILE go together"),
        ({"FLUX_TLS_CERT_FILE": "{cert}", "FLUX_TLS_KEY_FILE": "{missing}"}, "invalid FLUX_TLS_KEY_FILE: cannot read"),
        (
            {"FLUX_TLS_CERT_FILE": "{cert}", "FLUX_TLS_KEY_FILE": "{client_key}"},
            "FLUX_TLS_KEY_FILE ({client_key}) is not the key of the certificate in FLUX_TLS_CERT_FILE",
        ),
        (
            {"FLUX_TLS_CERT_FILE": "{ca}", "FLUX_TLS_KEY_FILE": "{ca}"},
            "invalid FLUX_TLS_CERT_FILE or FLUX_TLS_KEY_FILE",
        ),
        ({"FLUX_TLS_CLIENT_CA_FILE": "{ca}"}, "FLUX_TLS_CLIENT_CA_FILE asks clients for certificates over TLS"),
        ({"FLUX_TLS_CA_FILE": "{key}"}, "invalid FLUX_TLS_CA_FILE: {key} holds no PEM CA certificate"),
        ({"FLUX_ETCD_CA_FILE": "{missing}"}, "invalid FLUX_ETCD_CA_FILE: cannot read"),
        ({"FLUX_ETCD_CERT_FILE": "{client_cert}"}, "FLUX_ETCD_CERT_FILE and FLUX_ETCD_KEY_FILE go together"),
        ({"FLUX_RABBITMQ_KEY_FILE": "{client_key}"}, "FLUX_RABBITMQ_CERT_FILE and FLUX_RABBITMQ_KEY_FILE go together"),
        ({"FLUX_RABBITMQ_CA_FILE": "{key}"}, "invalid FLUX_RABBITMQ_CA_FILE"),
        (
            {"FLUX_RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:5672/", "FLUX_RABBITMQ_CA_FILE": "{ca}"},
            "FLUX_RABBITMQ_CA_FILE is for a TLS broker, but the URL amqp://guest:***@127.0.0.1:5672/ is plaintext",
        ),
        (
            {
                "FLUX_RABBITMQ_URL": "amqp://127.0.0.1/",
                "FLUX_RABBITMQ_CERT_FILE": "{client_cert}",
                "FLUX_RABBITMQ_KEY_FILE": "{client_key}",
            },
            "FLUX_RABBITMQ_CERT_FILE is for a TLS broker",
        ),
        ({"FLUX_AUTH_TOKENS_FILE": "{missing}"}, "invalid FLUX_AUTH_TOKENS_FILE: cannot read"),
        ({"FLUX_ETCD_USERNAME": "root"}, "FLUX_ETCD_USERNAME and FLUX_ETCD_PASSWORD go together"),
    ],
)
def test_a_bad_tls_or_token_file_names_its_setting(
    env: dict[str, str], message: str, certificates: Certificates, tmp_path: Path
) -> None:
    paths = {**dataclasses.asdict(certificates), "missing": str(tmp_path / "missing.pem")}
    with pytest.raises(config.ConfigError) as info:
        config.load({}, {name: value.format(**paths) for name, value in env.items()})
    assert message.format(**paths) in str(info.value)


def test_tls_files_that_fit_are_accepted(certificates: Certificates) -> None:
    s = config.load({}, {"FLUX_" + k.upper(): v for k, v in certificates.server_settings(mutual=True).items()})
    assert (s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file) == (
        certificates.cert,
        certificates.key,
        certificates.ca,
    )


def test_rabbitmq_tls_files_with_an_amqps_url_are_accepted(certificates: Certificates) -> None:
    env = {
        "FLUX_RABBITMQ_URL": "amqps://127.0.0.1/",
        "FLUX_RABBITMQ_CA_FILE": certificates.ca,
        "FLUX_RABBITMQ_CERT_FILE": certificates.client_cert,
        "FLUX_RABBITMQ_KEY_FILE": certificates.client_key,
    }
    s = config.load({}, env)
    assert (s.rabbitmq_ca_file, s.rabbitmq_cert_file, s.rabbitmq_key_file) == (
        certificates.ca,
        certificates.client_cert,
        certificates.client_key,
    )


def test_the_etcd_password_is_not_in_the_settings_repr() -> None:
    s = config.load({}, {"FLUX_ETCD_USERNAME": "fluxkv", "FLUX_ETCD_PASSWORD": "s3cret-of-the-test"})
    assert s.etcd_password == "s3cret-of-the-test"
    assert "s3cret-of-the-test" not in repr(s) and "fluxkv" in repr(s)
