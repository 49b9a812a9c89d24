"""An HTTP server for an ASGI app, inside the running event loop: uvicorn (with
httptools), started and stopped by its owner rather than by uvicorn's own
`run()`, which would take the process's signals and exit the process when it
cannot bind. The nodes' admin port and fluxkv-gateway serve their apps on it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable

import uvicorn
from starlette.types import ASGIApp

# uvicorn's own lines ("Started server process", "Shutting down") say nothing its owner's log does not.
logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


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
            http="httptools",
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
