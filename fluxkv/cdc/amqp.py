"""What the CDC publisher and consumer share about connecting to RabbitMQ: the
ssl context for an amqps:// URL (aiormq does the TLS), connecting, and a
failed connection's reason in words, so that a TLS failure says what was
refused."""

from __future__ import annotations

import asyncio
import ssl

import aio_pika
from aio_pika.abc import AbstractConnection
from aiormq.exceptions import AMQPConnectionError

from fluxkv.security.tls import TLS

# One reason for every way a broker refuses the client's certificate (or its lack of one), so that a log
# line, which comes only when the reason changes, is not repeated as the way alternates (ClientRefusedError).
CLIENT_REFUSED = (
    "TLS: the broker refused the client: it requires a client certificate signed by a CA it trusts, "
    "and got none or another"
)
# OpenSSL's reasons for alerts that refuse the client's certificate.
_CLIENT_ALERTS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED",
    "TLSV1_ALERT_UNKNOWN_CA",
    "SSLV3_ALERT_BAD_CERTIFICATE",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
}


class ClientRefusedError(ConnectionError):
    """The broker reset a TLS connection while it was being opened. Under TLS 1.3 a broker checks the
    client's certificate after the client has finished its handshake and sent its first bytes; when it
    refuses it, its alert and a reset race, and the reset can come first, taking the alert with it."""


def ssl_context(url: str, tls: TLS) -> ssl.SSLContext | None:
    """For an amqps:// URL, a context that verifies the broker with tls.ca_file
    (the system's CAs when empty) and presents tls's client certificate if it
    has one; None for amqp://."""
    return tls.ssl_context() if url.startswith("amqps://") else None


async def connect(url: str, context: ssl.SSLContext | None, timeout: float) -> AbstractConnection:
    """Open a connection (with `context` for amqps://), as aio_pika.connect does; raises ClientRefusedError
    for a TLS connection reset before it was open."""
    try:
        return await aio_pika.connect(url, timeout=timeout, ssl_context=context)
    except AMQPConnectionError as exc:
        if context is not None and isinstance(exc.__cause__, ConnectionResetError | asyncio.IncompleteReadError):
            raise ClientRefusedError(str(exc)) from exc
        raise


def failure(exc: BaseException) -> str:
    """Why connecting or a connection failed, for a log line and Info."""
    if isinstance(exc, ClientRefusedError):
        return CLIENT_REFUSED
    tls = exc if isinstance(exc, ssl.SSLError) else exc.__cause__  # aiormq raises its own error from ssl's
    if isinstance(tls, ssl.SSLCertVerificationError):
        return f"TLS: the broker's certificate did not verify ({tls.verify_message}): is the CA file the right one?"
    if isinstance(tls, ssl.SSLError):
        if tls.reason in _CLIENT_ALERTS:
            return CLIENT_REFUSED
        if tls.reason == "WRONG_VERSION_NUMBER":
            return "TLS: the broker did not answer in TLS: is this port its amqps:// (TLS) listener?"
        return f"TLS: {tls}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
