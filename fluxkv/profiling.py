"""On-demand CPU profiles of the node over HTTP, in place of the pprof endpoint
Flux-KV (Go) served: `GET /debug/pprof/profile?seconds=N` records this process
with py-spy for N seconds and answers the file.

The HTTP side is a deliberately small HTTP/1.1 server on asyncio streams: GET
only, no request bodies, bounded request line and headers, a deadline for
reading the request, and one answer per connection (then it closes). py-spy
runs as a child process with --nonblocking, so the node keeps serving (and is
never paused) while it samples, and the event loop only waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

log = logging.getLogger("fluxkv.profiling")

INDEX_PATH = "/debug/pprof/"
PROFILE_PATH = "/debug/pprof/profile"
MIN_SECONDS, MAX_SECONDS, DEFAULT_SECONDS = 1, 300, 30
SAMPLE_RATE = 100
# (content type, file name suffix, served as a download) per py-spy format.
FORMATS: Mapping[str, tuple[str, str, bool]] = {
    "speedscope": ("application/json", "speedscope.json", True),
    "flamegraph": ("image/svg+xml", "svg", False),
    "raw": ("text/plain; charset=utf-8", "txt", False),
}
DEFAULT_FORMAT = "speedscope"

MAX_LINE_BYTES = 8 * 1024  # the request line, and each header line
MAX_HEADER_BYTES = 32 * 1024  # all header lines together
MAX_HEADERS = 100
REQUEST_TIMEOUT_S = 10.0  # to receive the whole request (slow clients get 408)
SEND_TIMEOUT_S = 60.0  # to hand the answer to a slow reader
LINGER_S, LINGER_MAX_BYTES = 2.0, 1024 * 1024  # input still read after the answer, before closing
PY_SPY_SLACK_S = 30.0  # py-spy's own start-up and write time on top of the duration

_PY_SPY = "py-spy"
_INSTALL_HINT = "pip install 'fluxkv[profile]'"


def find_py_spy() -> str | None:
    """py-spy next to this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / _PY_SPY
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(_PY_SPY)


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


class ProfilingServer:
    """The /debug/pprof/ endpoint of one node; start() binds, stop() closes."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.requested_port = port
        self.port = 0
        self.py_spy = find_py_spy()
        self.profiles = 0  # recorded and answered
        self.refused_busy = 0  # answered 409 because another profile was recording
        self._recording_until: float | None = None  # monotonic end of the profile in progress
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{INDEX_PATH}"

    @property
    def recording(self) -> bool:
        return self._recording_until is not None

    async def start(self) -> None:
        """Listen on host:port (OSError if it cannot) and log where."""
        try:
            self._server = await asyncio.start_server(
                self._accept, self.host, self.requested_port, limit=MAX_LINE_BYTES
            )
        except OSError as exc:
            raise OSError(f"cannot listen for profiles on {self.host}:{self.requested_port}: {exc}") from None
        self.port = self._server.sockets[0].getsockname()[1]
        if self.py_spy is not None:
            log.info("profiling on %s (py-spy)", self.url)
        else:
            log.warning(
                "profiling on %s (py-spy not found: profiles answer 503 until it is installed, %s)",
                self.url,
                _INSTALL_HINT,
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

    def describe(self) -> str:
        tool = self.py_spy or f"py-spy not found ({_INSTALL_HINT})"
        now = "one recording now; " if self.recording else ""
        return (
            f"{self.url} with {tool}; {now}{self.profiles} profiles recorded, "
            f"{self.refused_busy} refused while another was recording"
        )

    # -- HTTP ----------------------------------------------------------------

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A task of our own (not one asyncio makes for a coroutine callback) so that
        # stop() can cancel it without asyncio logging the cancellation as an error.
        task = asyncio.create_task(self._serve_connection(reader, writer), name="fluxkv-pprof-connection")
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
                response = _text(exc.status, exc.message, exc.headers)
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
        if request.path in (INDEX_PATH, INDEX_PATH.rstrip("/")):
            return _text(HTTPStatus.OK, self._index())
        if request.path == PROFILE_PATH:
            seconds, fmt = _profile_parameters(request.query)
            return await self._profile(seconds, fmt)
        raise HttpError(HTTPStatus.NOT_FOUND, f"no page at {request.path}; see {INDEX_PATH}")

    def _index(self) -> str:
        tool = self.py_spy or f"not found: profiles answer 503 until it is installed ({_INSTALL_HINT})"
        return (
            "FluxKV node profiling (Flux-KV served Go's pprof here)\n\n"
            f"{PROFILE_PATH}?seconds=N&format=F\n"
            f"    CPU profile of this node's process: py-spy samples its busy threads {SAMPLE_RATE} times\n"
            f"    a second for N seconds ({MIN_SECONDS} to {MAX_SECONDS}, default {DEFAULT_SECONDS}).\n"
            "    F: speedscope (JSON for https://www.speedscope.app, the default), flamegraph (SVG; needs at least\n"
            "    one sample, which an idle node may not give) or raw (collapsed stacks, text).\n"
            "    One profile at a time; another request meanwhile answers 409.\n\n"
            f"py-spy: {tool}\n"
        )

    # -- py-spy ----------------------------------------------------------------

    async def _profile(self, seconds: int, fmt: str) -> Response:
        self.py_spy = find_py_spy()
        if self.py_spy is None:
            raise HttpError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"py-spy is not installed (looked in {Path(sys.executable).parent} and on PATH); "
                f"install it with {_INSTALL_HINT}",
            )
        if self._recording_until is not None:
            self.refused_busy += 1
            left = max(1, round(self._recording_until - time.monotonic()))
            raise HttpError(
                HTTPStatus.CONFLICT,
                f"another profile is being recorded (one at a time); try again in about {left} s",
                {"Retry-After": str(left)},
            )
        content_type, suffix, download = FORMATS[fmt]
        self._recording_until = time.monotonic() + seconds
        try:
            body = await _record(self.py_spy, seconds, fmt)
        except OSError as exc:
            raise HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, f"cannot record a profile: {exc}") from None
        finally:
            self._recording_until = None
        self.profiles += 1
        headers = {"Cache-Control": "no-store"}
        if download:
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            headers["Content-Disposition"] = f'attachment; filename="fluxkv-{os.getpid()}-{stamp}.{suffix}"'
        return Response(HTTPStatus.OK, content_type, body, headers)


async def _record(py_spy: str, seconds: int, fmt: str) -> bytes:
    """Run py-spy on this process for `seconds` and return the file it wrote."""
    fd, output = tempfile.mkstemp(prefix="fluxkv-profile-", suffix=f".{fmt}")
    os.close(fd)
    try:
        # py-spy writes the file itself; its stdout and stderr only say what it did.
        proc = await asyncio.create_subprocess_exec(
            py_spy,
            "record",
            "--pid",
            str(os.getpid()),
            "--duration",
            str(seconds),
            "--rate",
            str(SAMPLE_RATE),
            "--format",
            fmt,
            "--output",
            output,
            "--nonblocking",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(seconds + PY_SPY_SLACK_S):
                said, _ = await proc.communicate()
        except TimeoutError:
            raise HttpError(
                HTTPStatus.INTERNAL_SERVER_ERROR, f"py-spy did not finish within {seconds + PY_SPY_SLACK_S:.0f} s"
            ) from None
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            raise HttpError(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                f"py-spy failed (exit status {proc.returncode}): {_py_spy_error(said)}",
            )
        return await asyncio.to_thread(Path(output).read_bytes)
    finally:
        os.unlink(output)


def _py_spy_error(output: bytes) -> str:
    """The line of py-spy's output that says what went wrong (it may add a backtrace)."""
    lines = [line.strip() for line in output.decode(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error:")]
    return (errors or lines or ["no output"])[0][:500]


def _profile_parameters(query: str) -> tuple[int, str]:
    """seconds and format from the query string; HttpError 400 says what is wrong."""
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query), max_num_fields=10)
    except ValueError as exc:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"bad query string {query!r}: {exc}") from None
    params: dict[str, str] = {}
    for name, value in pairs:
        if name not in ("seconds", "format"):
            raise HttpError(HTTPStatus.BAD_REQUEST, f"unknown parameter {name!r}; expected seconds and format")
        if name in params:
            raise HttpError(HTTPStatus.BAD_REQUEST, f"parameter {name!r} given more than once")
        params[name] = value
    text = params.get("seconds", str(DEFAULT_SECONDS))
    if not (text.isascii() and text.isdigit() and len(text) <= 3 and MIN_SECONDS <= int(text) <= MAX_SECONDS):
        raise HttpError(
            HTTPStatus.BAD_REQUEST,
            f"seconds must be an integer from {MIN_SECONDS} to {MAX_SECONDS}, got {text!r}",
        )
    seconds = int(text)
    fmt = params.get("format", DEFAULT_FORMAT)
    if fmt not in FORMATS:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return seconds, fmt


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
    return Request(method, unquote(url.path), url.query)


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


def _text(status: HTTPStatus, message: str, headers: Mapping[str, str] | None = None) -> Response:
    body = message if message.endswith("\n") else message + "\n"
    return Response(status, "text/plain; charset=utf-8", body.encode(), dict(headers or {}))


def _encode(response: Response) -> bytes:
    head = [
        f"HTTP/1.1 {response.status.value} {response.status.phrase}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in response.headers.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + response.body
