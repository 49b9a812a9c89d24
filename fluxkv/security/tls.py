"""TLS from PEM files: credentials for gRPC servers and channels, and ssl
contexts for the admin port and the clients of etcd and RabbitMQ.

config.py has already checked, at start-up, that each file named by a setting
can be read and holds what it should."""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from fluxkv import arguments
from fluxkv.config import Settings


@dataclass(frozen=True)
class TLS:
    """How a client speaks TLS: the CA certificates it verifies the server with
    (empty: the system's) and, for a server that asks for one, its own
    certificate and key."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file),
            private_key=_read(self.key_file),
            certificate_chain=_read(self.cert_file),
        )

    def ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_file or None)
        if self.cert_file:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


def add_client_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """A client program's flags for a node's TLS and tokens: --tls, --tls-ca, --tls-cert, --tls-key, --token."""
    parser.add_argument(
        "--token",
        default=os.environ.get("FLUX_TOKEN") or None,
        metavar="TOKEN",
        help="send `authorization: Bearer TOKEN` with each call (default: $FLUX_TOKEN)",
    )
    parser.add_argument("--tls", action="store_true", help="connect over TLS (implied by --tls-ca and --tls-cert)")
    parser.add_argument(
        "--tls-ca",
        type=arguments.readable,
        metavar="FILE",
        help="PEM CA certificates to verify the node with (default: the system's)",
    )
    parser.add_argument("--tls-cert", type=arguments.readable, metavar="FILE", help="PEM client certificate")
    parser.add_argument("--tls-key", type=arguments.readable, metavar="FILE", help="PEM private key of --tls-cert")


def client_tls(args: argparse.Namespace, parser: argparse.ArgumentParser) -> TLS | None:
    """The TLS that add_client_arguments' flags ask for (None: plaintext); a usage error if they do not fit."""
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if not (args.tls or args.tls_ca or args.tls_cert):
        return None
    return TLS(args.tls_ca or "", args.tls_cert or "", args.tls_key or "")


def serves_tls(settings: Settings) -> bool:
    return bool(settings.tls_cert_file)


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The gRPC port's credentials: the node's certificate and, with a client CA, mutual TLS (None: the
    node serves plaintext)."""
    if not serves_tls(settings):
        return None
    client_ca = _read(settings.tls_client_ca_file)
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key_file).read_bytes(), Path(settings.tls_cert_file).read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The admin port's context: the gRPC port's certificate (None: the node serves plaintext). It asks for
    no client certificate, even under mutual TLS, so that probes reach /healthz and /readyz; tokens guard the
    other pages."""
    if not serves_tls(settings):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    return context


def gateway_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """fluxkv-gateway's HTTP port: the same certificate as a node's gRPC port and, with a client CA, mutual
    TLS as there (None: plain HTTP)."""
    context = server_ssl_context(settings)
    if context is not None and settings.tls_client_ca_file:
        context.load_verify_locations(settings.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def peer_tls(settings: Settings) -> TLS | None:
    """How a node reaches another node over TLS: it verifies the peer with FLUX_TLS_CA_FILE
    and, when nodes ask for client certificates, presents its own (None: nodes serve plaintext)."""
    if not serves_tls(settings):
        return None
    mutual = bool(settings.tls_client_ca_file)
    return TLS(
        ca_file=settings.tls_ca_file,
        cert_file=settings.tls_cert_file if mutual else "",
        key_file=settings.tls_key_file if mutual else "",
    )


def etcd_tls(settings: Settings) -> TLS | None:
    """How the node (and the CLI and fluxkv-bench) reach etcd: TLS when FLUX_ETCD_CA_FILE or a client
    certificate is set, else whatever the endpoints' scheme says."""
    if not (settings.etcd_ca_file or settings.etcd_cert_file):
        return None
    return TLS(settings.etcd_ca_file, settings.etcd_cert_file, settings.etcd_key_file)


def aio_channel(
    target: str, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """A grpc.aio channel to `target`: over TLS with `credentials`, in plaintext without."""
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options)
    return grpc.aio.secure_channel(target, credentials, options=options)


def channel(
    target: str, credentials: grpc.ChannelCredentials | None, options: Sequence[tuple[str, Any]] | None = None
) -> grpc.Channel:
    """A blocking grpc channel to `target`: over TLS with `credentials`, in plaintext without."""
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None
