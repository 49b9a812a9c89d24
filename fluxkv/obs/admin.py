"""The admin HTTP port (FLUX_ADMIN_PORT): one small HTTP server per node for
what operators and orchestrators ask of it, apart from the gRPC port: the
Prometheus metrics, liveness and readiness, and (FLUX_PPROF_ENABLED) the
py-spy CPU profiles of fluxkv/obs/profiling.py. The node gives it its pages.

A Starlette app on uvicorn (fluxkv/obs/http_server.py), as fluxkv-gateway:
GET only and no request bodies; uvicorn parses HTTP and keeps connections alive.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from fluxkv.obs.http_server import HttpServer

__all__ = ["AdminServer", "Handler", "HttpError", "Page", "Request", "Response", "text"]

log = logging.getLogger("fluxkv.admin")

# Requests in flight when stop() begins are cut short (they answer 503): the
# grace period only lets those answers out. Idle keep-alive connections close after KEEP_ALIVE_S.
GRACE_S = 1.0
KEEP_ALIVE_S = 5.0


class HttpError(Exception):
    """An answer other than 200: its status, a message for people, extra headers."""

    def __init__(self, status: HTTPStatus, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


Handler = Callable[[Request], Coroutine[Any, Any, Response]]


@dataclass(frozen=True)
class Page:
    """A path's handler and a line about it for the index at /."""

    handler: Handler
    about: str


class AdminServer:
    """Serves `pages` ({path: Page}) on host:port; start() binds, stop() closes.
    A path also answers with a trailing slash added or removed."""

    def __init__(self, host: str, port: int, pages: Mapping[str, Page], tls: ssl.SSLContext | None = None) -> None:
        """`tls`: serve HTTPS with this context (None: plain HTTP)."""
        self._pages = {"/": Page(self._index, "this list"), **pages}
        routes = [Route(path, self._endpoint(path, page)) for path, page in self._pages.items()]
        # The other spelling of each path serves the same page (rather than Starlette's redirect).
        routes += [Route(_other_spelling(r.path), r.endpoint) for r in routes if r.path != "/"]
        app = Starlette(routes=routes, exception_handlers={HTTPStatus.NOT_FOUND.value: _not_found})
        self._http = HttpServer(
            _gets_only(app), host, port, tls=tls, what="admin", grace_s=GRACE_S, keep_alive_s=KEEP_ALIVE_S
        )
        self._running: set[asyncio.Task[Response]] = set()  # the pages answering now
        self._stopping = False

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def url(self) -> str:
        return self._http.url

    async def start(self) -> None:
        """Listen on host:port (OSError if it cannot) and log where."""
        await self._http.start()
        log.info(
            "admin on %s (%s)",
            self.url,
            ", ".join(p for p in self._pages if p != "/"),
            extra={"event": "admin_listening", "url": self.url},
        )

    async def stop(self) -> None:
        """Stop listening; a page still answering (a profile in progress) is cut short with a 503."""
        self._stopping = True
        for task in self._running:
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        await self._http.stop()

    async def _index(self, request: Request) -> Response:
        width = max(len(p) for p in self._pages)
        lines = [f"{path:<{width}}  {page.about}" for path, page in self._pages.items()]
        return text(HTTPStatus.OK, "FluxKV node admin port\n\n" + "\n".join(lines))

    def _endpoint(self, path: str, page: Page) -> Callable[[Request], Awaitable[Response]]:
        async def answer(request: Request) -> Response:
            try:
                return await self._run(path, page, request)
            except HttpError as exc:
                return text(exc.status, exc.message, exc.headers)

        return answer

    async def _run(self, path: str, page: Page, request: Request) -> Response:
        """The page's answer, in a task of its own that stop() can cancel."""
        if self._stopping:
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, "the node is stopping")
        task = asyncio.create_task(page.handler(request), name=f"fluxkv-admin {path}")
        self._running.add(task)
        try:
            return await task
        except HttpError:
            raise
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not task.cancelled() or (current is not None and current.cancelling()):
                raise  # this request itself is cancelled, not only its page
            raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE, f"{path} was cut short: the node is stopping") from None
        except Exception as exc:
            log.exception("admin page %s failed", path)
            raise HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, f"{path} failed: {type(exc).__name__}") from None
        finally:
            self._running.discard(task)


def text(status: HTTPStatus, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """A text/plain answer; the message ends with a newline."""
    body = message if message.endswith("\n") else message + "\n"
    return PlainTextResponse(body, status.value, dict(headers or {}))


def _other_spelling(path: str) -> str:
    return path[:-1] if path.endswith("/") else path + "/"


async def _not_found(request: Request, exc: Exception) -> Response:
    return text(HTTPStatus.NOT_FOUND, f"no page at {request.url.path}; see /")


def _gets_only(app: ASGIApp) -> ASGIApp:
    """`app` behind the admin port's rules: GET only (405), and no request body (400)."""

    async def gate(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            refusal = None
            if "transfer-encoding" in headers or headers.get("content-length", "0") != "0":
                # Closed after the answer: the body is not read.
                refusal = text(HTTPStatus.BAD_REQUEST, "a request body is not accepted", {"Connection": "close"})
            elif scope["method"] != "GET":
                refusal = text(
                    HTTPStatus.METHOD_NOT_ALLOWED, f"{scope['method']} is not supported; use GET", {"Allow": "GET"}
                )
            if refusal is not None:
                await refusal(scope, receive, send)
                return
        await app(scope, receive, send)

    return gate
