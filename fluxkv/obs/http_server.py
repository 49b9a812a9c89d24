"""An HTTP server for an ASGI app, inside the running event loop: uvicorn (with
httptools), started and stopped by its owner rather than by uvicorn's own
`run()`, which would take the process's signals and exit the process when it
cannot bind. The nodes' admin port and fluxkv-gateway serve their apps on it.

uvicorn's httptools protocol bounds neither the size of a request's line and
headers nor the time to receive them (its keep-alive timeout only runs between
requests); _BoundedRequests adds both.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from http import HTTPStatus

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# uvicorn's own lines ("Started server process", "Shutting down") say nothing its owner's log does not.
logging.getLogger("uvicorn.error").setLevel(logging.WARNING)

MAX_HEAD_BYTES = 32 * 1024  # a request line and its headers together (more: 431)
HEAD_TIMEOUT_S = 10.0  # to receive them, from the connection or the request's first byte (then: 408)


class HttpServer:
    """Serves `app` on host:port (0: a free port), HTTPS with `tls`. start()
    binds (OSError naming `what` if it cannot) and serves; stop() stops
    accepting, lets requests in flight finish within `grace_s`, then cancels them."""

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        what: str = "HTTP",
        grace_s: float = 5.0,
        keep_alive_s: float = 5.0,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.port = 0
        self._what = what
        self._tls = tls
        config = uvicorn.Config(
            app,
            http=_BoundedRequests,
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=int(grace_s) or 1,
            timeout_keep_alive=int(keep_alive_s) or 1,
            ssl_context_factory=_fixed_context(tls) if tls is not None else None,
        )
        self._server = uvicorn.Server(config)
        self._ticks: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self._tls is not None else 'http'}://{host}:{self.port}/"

    async def start(self) -> None:
        sock = _bind(self.host, self.requested_port, self._what)
        self.port = sock.getsockname()[1]
        config = self._server.config
        config.load()
        self._server.lifespan = config.lifespan_class(config)
        await self._server.startup(sockets=[sock])
        # uvicorn's once-a-second work (the Date header), and its exit flag.
        self._ticks = asyncio.create_task(self._server.main_loop(), name=f"fluxkv-{self._what}-ticks")

    async def stop(self) -> None:
        """Stop serving; connections still open when the grace period ends are closed."""
        if self._ticks is None:
            return
        self._server.should_exit = True
        await self._ticks
        self._ticks = None
        await self._server.shutdown()


def _fixed_context(tls: ssl.SSLContext) -> Callable[[uvicorn.Config, Callable[[], ssl.SSLContext]], ssl.SSLContext]:
    return lambda _config, _default: tls


def _bind(host: str, port: int, what: str) -> socket.socket:
    """A listening TCP socket on host:port, as asyncio's create_server would make it."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(2048)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise OSError(f"cannot listen for the {what} port on {host}:{port}: {exc}") from None
    return sock


class _BoundedRequests(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a request's line and headers bounded in size
    (MAX_HEAD_BYTES) and in time (HEAD_TIMEOUT_S). A whole head is measured when it ends;
    one still arriving is counted by the chunks received, so its buffer stays bounded."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._head_size = 0  # the line and headers of the request in progress, as parsed
        self._received = 0  # bytes received since the last head ended, while no head ends
        self._in_body = self._head_ended = self._too_large = False
        self._head_deadline: asyncio.TimerHandle | None = self.loop.call_later(HEAD_TIMEOUT_S, self._too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        in_head, self._head_ended = not self._in_body, False
        super().data_received(data)
        if in_head and not self._head_ended and not self.transport.is_closing():
            self._received += len(data)  # a head still arriving: what the parser holds of it
            if self._received > MAX_HEAD_BYTES:
                self._refuse_too_large()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_size = 0
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(HEAD_TIMEOUT_S, self._too_slow)

    def on_url(self, url: bytes) -> None:
        self._head_size += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value) + 4
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._cancel_deadline()
        self._head_ended, self._received = True, 0
        if self._head_size > MAX_HEAD_BYTES:
            # Stops the parser: uvicorn answers its failures with send_400_response, below.
            self._too_large = True
            raise ValueError("request head too large")
        self._in_body = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self._too_large:
            self._refuse_too_large()
        else:
            super().send_400_response(msg)

    def _cancel_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _too_slow(self) -> None:
        self._head_deadline = None
        self._refuse(HTTPStatus.REQUEST_TIMEOUT, f"no complete request line and headers within {HEAD_TIMEOUT_S:g} s")

    def _refuse_too_large(self) -> None:
        self._refuse(
            HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, f"request line and headers over {MAX_HEAD_BYTES} bytes"
        )

    def _refuse(self, status: HTTPStatus, message: str) -> None:
        """Answer `status` and close; only close if an answer to an earlier request is under way."""
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:
            body = message.encode() + b"\n"
            self.transport.write(
                f"HTTP/1.1 {status.value} {status.phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                + body
            )
        self.transport.close()
