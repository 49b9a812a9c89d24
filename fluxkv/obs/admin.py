"""The admin HTTP port (FLUX_ADMIN_PORT): one small HTTP server per node for
what operators and orchestrators ask of it, apart from the gRPC port: the
Prometheus metrics, liveness and readiness, and (FLUX_PPROF_ENABLED) the
py-spy CPU profiles of fluxkv/obs/profiling.py. The node gives it its pages.

It is a deliberately small HTTP/1.1 server on asyncio streams: GET only, no
request bodies, bounded request line and headers, a deadline for reading the
request, and one answer per connection (then it closes).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import unquote, urlsplit

log = logging.getLogger("fluxkv.admin")

MAX_LINE_BYTES = 8 * 1024  # the request line, and each header line
MAX_HEADER_BYTES = 32 * 1024  # all header lines together
MAX_HEADERS = 100
REQUEST_TIMEOUT_S = 10.0  # to receive the whole request (slow clients get 408)
SEND_TIMEOUT_S = 60.0  # to hand the answer to a slow reader
LINGER_S, LINGER_MAX_BYTES = 2.0, 1024 * 1024  # input still read after the answer, before closing


class HttpError(Exception):
    """An answer other than 200: its status, a message for people, extra headers."""

    def __init__(self, status: HTTPStatus, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass
class Response:
    status: HTTPStatus
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    # By lower-case name; the last of a repeated header.
    headers: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]


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
        self.host = host
        self._tls = tls
        self.requested_port = port
        self.port = 0
        self._pages = {"/": Page(self._index, "this list"), **pages}
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self._tls is not None else 'http'}://{host}:{self.port}/"

    async def start(self) -> None:
        """Listen on host:port (OSError if it cannot) and log where."""
        try:
            self._server = await asyncio.start_server(
                self._accept, self.host, self.requested_port, limit=MAX_LINE_BYTES, ssl=self._tls
            )
        except OSError as exc:
            raise OSError(f"cannot listen for the admin port on {self.host}:{self.requested_port}: {exc}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info(
            "admin on %s (%s)",
            self.url,
            ", ".join(p for p in self._pages if p != "/"),
            extra={"event": "admin_listening", "url": self.url},
        )

    async def stop(self) -> None:
        """Stop listening and end open connections (a profile in progress is cut short)."""
        if self._server is None:
            return
        self._server.close()
        for task in self._connections:
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()

    async def _index(self, request: Request) -> Response:
        width = max(len(p) for p in self._pages)
        lines = [f"{path:<{width}}  {page.about}" for path, page in self._pages.items()]
        return text(HTTPStatus.OK, "FluxKV node admin port\n\n" + "\n".join(lines))

    # -- HTTP ----------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A task of our own (not one asyncio makes for a coroutine callback) so that
        # stop() can cancel it without asyncio logging the cancellation as an error.
        task = asyncio.create_task(self._serve_connection(reader, writer), name="fluxkv-admin-connection")
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                request = await _receive(reader)
                if request is None:  # the client left before sending a whole request
                    return
                response = await self._answer(request)
            except HttpError as exc:
                response = text(exc.status, exc.message, exc.headers)
            async with asyncio.timeout(SEND_TIMEOUT_S):
                writer.write(_encode(response))
                await writer.drain()
            await _linger(reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client went away or stopped reading: nothing more to do
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    async def _answer(self, request: Request) -> Response:
        if request.method != "GET":
            raise HttpError(
                HTTPStatus.METHOD_NOT_ALLOWED, f"{request.method} is not supported; use GET", {"Allow": "GET"}
            )
        path = request.path
        page = self._pages.get(path) or self._pages.get(path + "/" if not path.endswith("/") else path[:-1])
        if page is None:
            raise HttpError(HTTPStatus.NOT_FOUND, f"no page at {path}; see /")
        try:
            return await page.handler(request)
        except HttpError:
            raise
        except Exception as exc:
            log.exception("admin page %s failed", path)
            raise HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, f"{path} failed: {type(exc).__name__}") from None


def text(status: HTTPStatus, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """A text/plain answer; the message ends with a newline."""
    body = message if message.endswith("\n") else message + "\n"
    return Response(status, "text/plain; charset=utf-8", body.encode(), dict(headers or {}))


async def _receive(reader: asyncio.StreamReader) -> Request | None:
    """The request, within REQUEST_TIMEOUT_S; None if the client closed first."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            return await _read_request(reader)
    except TimeoutError:
        raise HttpError(HTTPStatus.REQUEST_TIMEOUT, f"no complete request within {REQUEST_TIMEOUT_S:.0f} s") from None


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then read what the client still sends (bounded) until it closes.
    Closing with unread input would reset the connection and could destroy the
    answer before the client reads it (say, after a 414 for a huge request line)."""
    writer.write_eof()
    left = LINGER_MAX_BYTES
    async with asyncio.timeout(LINGER_S):
        while left > 0 and (chunk := await reader.read(min(left, 64 * 1024))):
            left -= len(chunk)


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    """Read a request line and its headers; None if the client closed first."""
    line = await _read_line(reader, HTTPStatus.REQUEST_URI_TOO_LONG, "request line")
    if line is None:
        return None
    parts = line.split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1") or not parts[1].startswith("/"):
        raise HttpError(HTTPStatus.BAD_REQUEST, f"not an HTTP/1.x request line: {line[:200]!r}")
    method, target, _ = parts
    header_bytes = header_lines = 0
    headers: dict[str, str] = {}
    while True:
        header = await _read_line(reader, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "header line")
        if header is None:
            return None
        if not header:
            break
        header_bytes += len(header)
        header_lines += 1
        if header_bytes > MAX_HEADER_BYTES or header_lines > MAX_HEADERS:
            raise HttpError(
                HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                f"headers over {MAX_HEADER_BYTES} bytes or {MAX_HEADERS} lines",
            )
        name, colon, value = header.partition(":")
        if not colon or not name or name != name.strip():
            raise HttpError(HTTPStatus.BAD_REQUEST, f"malformed header line: {header[:200]!r}")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers or headers.get("content-length", "0") != "0":
        raise HttpError(HTTPStatus.BAD_REQUEST, "a request body is not accepted")
    url = urlsplit(target)
    return Request(method, unquote(url.path), url.query, headers)


async def _read_line(reader: asyncio.StreamReader, too_long: HTTPStatus, what: str) -> str | None:
    """One CRLF- (or LF-) terminated line without its ending; None at end of input."""
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        raise HttpError(too_long, f"{what} over {MAX_LINE_BYTES} bytes") from None
    try:
        return raw.rstrip(b"\r\n").decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{what} is not ASCII") from None


def _encode(response: Response) -> bytes:
    head = [
        f"HTTP/1.1 {response.status.value} {response.status.phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body
