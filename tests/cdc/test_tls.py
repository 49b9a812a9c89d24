"""CDC over TLS (amqps://) against private RabbitMQ nodes with a TLS listener
(conftest: rabbit_tls_broker, rabbit_mtls_broker): a node publishes and
fluxkv-cdc reads every change; a broker that requires a client certificate;
TLS failures that the node reports with a reason while it serves writes; TLS
files with a plaintext URL refused at start-up."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from deploy.private_servers import RabbitBroker
from fluxkv.cdc.amqp import CLIENT_REFUSED
from fluxkv.cdc.consumer import CdcConsumer
from fluxkv.proto import kv_pb2 as pb
from fluxkv.proto import kv_pb2_grpc
from fluxkv.security.tls import TLS
from tests.cdc.test_consumer import fluxkv_cdc, line_count, lines, wait_until
from tests.cdc.test_publisher import cdc
from tests.conftest import BROKER, ROOT, Certificates, Names, eventually, running_node


def fresh_names() -> Names:
    """An exchange and a queue of the test's own on a broker that the module's tests share."""
    tag = uuid.uuid4().hex[:12]
    return Names(f"fluxkv-tls-{tag}", f"fluxkv-tls-{tag}")


async def write_changes(kv: kv_pb2_grpc.KVStub) -> dict[int, tuple[str, str]]:
    """Sets, deletes and a MultiSet; the (op, key) of each acknowledged revision."""
    acked: dict[int, tuple[str, str]] = {}
    for i in range(60):
        written = await kv.Set(pb.SetRequest(key=f"k{i}", value=f"v{i}".encode()))
        acked[written.revision] = ("set", f"k{i}")
        if i % 10 == 9:
            deleted = await kv.Delete(pb.DeleteRequest(key=f"k{i - 1}"))
            acked[deleted.revision] = ("del", f"k{i - 1}")
    multi = await kv.MultiSet(pb.MultiSetRequest(items=[pb.SetRequest(key=f"m{i}", value=b"m") for i in range(20)]))
    for i, result in enumerate(multi.results):
        acked[result.revision] = ("set", f"m{i}")
    return acked


async def consume_to_file(
    names: Names, url: str, out: Path, count: int, *args: str, env: dict[str, str] | None = None
) -> None:
    """Run fluxkv-cdc until `out` holds `count` events, then stop it with SIGTERM (it must exit 0)."""
    with fluxkv_cdc(names, "--output", str(out), *args, url=url, env=env) as consumer:
        await wait_until(lambda: line_count(out) >= count, f"{count} events are written", lambda: consumer.log)
        assert await consumer.exit_status(signal.SIGTERM) == 0


@pytest.mark.usefixtures("grpc_server")
async def test_a_node_publishes_over_amqps_and_fluxkv_cdc_reads_every_change(
    rabbit_tls_broker: RabbitBroker, certificates: Certificates, tmp_path: Path
) -> None:
    names = fresh_names()
    url = rabbit_tls_broker.tls_url
    async with running_node(**cdc(names, url, rabbitmq_ca_file=certificates.ca, cdc_linger_ms=2)) as (node, kv):
        acked = await write_changes(kv)
        assert node.cdc is not None and await node.cdc.flush(30)
        info = await kv.Info(pb.InfoRequest())
        assert info.cdc.connection == "connected" and info.cdc.confirmed_revision == max(acked)
    out = tmp_path / "events.jsonl"
    await consume_to_file(names, url, out, len(acked), "--tls-ca", certificates.ca)
    assert [(e["rev"], e["op"], e["key"]) for e in lines(out)] == [(rev, *acked[rev]) for rev in sorted(acked)]


@pytest.mark.usefixtures("grpc_server")
async def test_a_broker_that_requires_a_client_certificate_gets_the_configured_one(
    rabbit_mtls_broker: RabbitBroker, certificates: Certificates, tmp_path: Path
) -> None:
    names = fresh_names()
    url = rabbit_mtls_broker.tls_url
    client = {
        "rabbitmq_ca_file": certificates.ca,
        "rabbitmq_cert_file": certificates.client_cert,
        "rabbitmq_key_file": certificates.client_key,
    }
    async with running_node(**cdc(names, url, **client)) as (node, kv):
        acked = await write_changes(kv)
        assert node.cdc is not None and await node.cdc.flush(30)
    out = tmp_path / "events.jsonl"
    # fluxkv-cdc takes the same files from the node's variables.
    env = {"FLUX_" + name.upper(): path for name, path in client.items()}
    await consume_to_file(names, url, out, len(acked), env=env)
    assert [e["rev"] for e in lines(out)] == sorted(acked)
    # Without a certificate it is refused, says why, and keeps trying until stopped.
    with fluxkv_cdc(names, "--tls-ca", certificates.ca, url=url) as refused:
        await refused.wait_for_log(CLIENT_REFUSED)
        assert await refused.exit_status(signal.SIGTERM) == 0
    assert "stopped; 0 events written" in refused.log


# What fails, and what the node says about it: the reason in Info and in its log.
FAILURES = {
    "wrong CA": "TLS: the broker's certificate did not verify",
    "wrong CA, no_verify_ssl=1 in the URL": "TLS: the broker's certificate did not verify",
    "no CA file: the system's CAs": "TLS: the broker's certificate did not verify",
    "not TLS": "TLS: the broker did not answer in TLS: is this port its amqps:// (TLS) listener?",
    # The same reason for both, whether the broker's alert or its reset comes first (amqp.ClientRefusedError).
    "no client certificate": CLIENT_REFUSED,
    "a client certificate of another CA": CLIENT_REFUSED,
}


@pytest.mark.usefixtures("grpc_server")
@pytest.mark.parametrize("failure", FAILURES)
async def test_a_tls_failure_is_reported_with_its_reason_while_writes_are_served(
    rabbit_tls_broker: RabbitBroker,
    rabbit_mtls_broker: RabbitBroker,
    certificates: Certificates,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="fluxkv.cdc")
    url, tls = {
        "wrong CA": (rabbit_tls_broker.tls_url, {"rabbitmq_ca_file": certificates.other_ca}),
        "wrong CA, no_verify_ssl=1 in the URL": (  # aiormq's switch: FluxKV's context leaves it unused
            rabbit_tls_broker.tls_url + "?no_verify_ssl=1",
            {"rabbitmq_ca_file": certificates.other_ca},
        ),
        "no CA file: the system's CAs": (rabbit_tls_broker.tls_url, {}),
        "not TLS": (rabbit_tls_broker.url.replace("amqp://", "amqps://"), {"rabbitmq_ca_file": certificates.ca}),
        "no client certificate": (rabbit_mtls_broker.tls_url, {"rabbitmq_ca_file": certificates.ca}),
        "a client certificate of another CA": (
            rabbit_mtls_broker.tls_url,
            {
                "rabbitmq_ca_file": certificates.ca,
                "rabbitmq_cert_file": certificates.other_client_cert,
                "rabbitmq_key_file": certificates.other_client_key,
            },
        ),
    }[failure]
    reason = FAILURES[failure]
    async with running_node(**cdc(fresh_names(), url, cdc_flush_timeout_s=0.1, **tls)) as (node, kv):
        publisher = node.cdc
        assert publisher is not None
        await eventually(lambda: publisher.last_error, "the publisher failed to connect")
        for i in range(20):
            await kv.Set(pb.SetRequest(key=f"k{i}", value=b"v"))
        assert (await kv.Get(pb.GetRequest(key="k19"))).value == b"v"
        info = await kv.Info(pb.InfoRequest())
    assert info.cdc.connection == "reconnecting" and info.cdc.queue_depth == 20
    [detail] = [s.detail for s in info.subsystems if s.name == "cdc" and s.state == "reconnecting"]
    assert reason in detail, detail
    assert f"CDC cannot reach the broker at {url.replace(':guest@', ':***@')} ({reason}" in caplog.text


async def test_fluxkv_cdc_says_why_a_broker_of_another_ca_is_refused(
    rabbit_tls_broker: RabbitBroker, certificates: Certificates
) -> None:
    with fluxkv_cdc(fresh_names(), "--tls-ca", certificates.other_ca, url=rabbit_tls_broker.tls_url) as consumer:
        await consumer.wait_for_log(f"cannot connect to {rabbit_tls_broker.tls_url.replace(':guest@', ':***@')} (")
        assert await consumer.exit_status(signal.SIGTERM) == 0
    assert "TLS: the broker's certificate did not verify (" in consumer.log  # then OpenSSL's words


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (
            ["--url", BROKER, "--tls-ca", "{ca}"],
            {},
            "--tls-ca is for a TLS broker, but the URL amqp://guest:***@127.0.0.1:5672/ is plaintext: use amqps://",
        ),
        (["--url", BROKER], {"FLUX_RABBITMQ_CA_FILE": "{ca}"}, "FLUX_RABBITMQ_CA_FILE is for a TLS broker"),
        (
            ["--url", "amqps://127.0.0.1/", "--tls-cert", "{client_cert}"],
            {},
            "--tls-cert and FLUX_RABBITMQ_KEY_FILE go together",
        ),
        (["--url", "amqps://127.0.0.1/", "--tls-ca", "{key}"], {}, "invalid --tls-ca: {key} holds no PEM CA"),
        (
            ["--url", "amqps://127.0.0.1/", "--tls-cert", "{client_cert}", "--tls-key", "{key}"],
            {},
            "--tls-key ({key}) is not the key of the certificate in --tls-cert",
        ),
    ],
)
def test_bad_tls_options_of_fluxkv_cdc_exit_2_naming_the_option(
    args: list[str], env: dict[str, str], message: str, certificates: Certificates
) -> None:
    paths = dataclasses.asdict(certificates)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}
    environ |= {name: value.format(**paths) for name, value in env.items()}
    done = subprocess.run(
        [sys.executable, str(ROOT / "cmd" / "fluxkv-cdc"), *(arg.format(**paths) for arg in args)],
        capture_output=True,
        text=True,
        env=environ,
        timeout=30,
    )
    assert done.returncode == 2
    assert message.format(**paths) in done.stderr


def test_the_consumer_refuses_an_ssl_context_for_a_plaintext_url(certificates: Certificates) -> None:
    with pytest.raises(ValueError, match="an ssl_context is for an amqps:// URL"):
        CdcConsumer(BROKER, ssl_context=TLS(certificates.ca).ssl_context())
