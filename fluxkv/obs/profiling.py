"""On-demand CPU profiles of the node, in place of the pprof endpoint Flux-KV
(Go) served: `GET /debug/pprof/profile?seconds=N` on the admin port
(fluxkv/obs/admin.py) records this process with py-spy for N seconds and answers
the file.

py-spy runs as a child process with --nonblocking, so the node keeps serving
(and is never paused) while it samples, and the event loop only waits for it.
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
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qsl

from fluxkv.obs.admin import HttpError, Page, Request, Response, text

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
PY_SPY_SLACK_S = 30.0  # py-spy's own start-up and write time on top of the duration

_PY_SPY = "py-spy"
_INSTALL_HINT = "pip install 'fluxkv[profile]'"


def find_py_spy() -> str | None:
    """py-spy next to this interpreter (the venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / _PY_SPY
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(_PY_SPY)


class Profiler:
    """The /debug/pprof/ pages of one node, for its admin server."""

    def __init__(self) -> None:
        self.py_spy = find_py_spy()
        self.profiles = 0  # recorded and answered
        self.refused_busy = 0  # answered 409 because another profile was recording
        self._recording_until: float | None = None  # monotonic end of the profile in progress

    @property
    def recording(self) -> bool:
        return self._recording_until is not None

    def pages(self) -> dict[str, Page]:
        return {
            INDEX_PATH: Page(self._index, "CPU profiles (py-spy), as Flux-KV's pprof"),
            PROFILE_PATH: Page(self._profile_page, "?seconds=N&format=F: a CPU profile of N seconds"),
        }

    def announce(self, admin_url: str) -> None:
        """Log where profiles are served, once the admin server listens at `admin_url`."""
        url = admin_url.rstrip("/") + INDEX_PATH
        if self.py_spy is not None:
            log.info("profiling on %s (py-spy)", url, extra={"event": "profiling", "url": url})
        else:
            log.warning(
                "profiling on %s (py-spy not found: profiles answer 503 until it is installed, %s)",
                url,
                _INSTALL_HINT,
            )

    def describe(self) -> str:
        tool = self.py_spy or f"py-spy not found ({_INSTALL_HINT})"
        now = "one recording now; " if self.recording else ""
        return (
            f"profiles at {INDEX_PATH} with {tool}; {now}{self.profiles} profiles recorded, "
            f"{self.refused_busy} refused while another was recording"
        )

    async def _index(self, request: Request) -> Response:
        tool = self.py_spy or f"not found: profiles answer 503 until it is installed ({_INSTALL_HINT})"
        return text(
            HTTPStatus.OK,
            "FluxKV node profiling (Flux-KV served Go's pprof here)\n\n"
            f"{PROFILE_PATH}?seconds=N&format=F\n"
            f"    CPU profile of this node's process: py-spy samples its busy threads {SAMPLE_RATE} times\n"
            f"    a second for N seconds ({MIN_SECONDS} to {MAX_SECONDS}, default {DEFAULT_SECONDS}).\n"
            "    F: speedscope (JSON for https://www.speedscope.app, the default), flamegraph (SVG; needs at least\n"
            "    one sample, which an idle node may not give) or raw (collapsed stacks, text).\n"
            "    One profile at a time; another request meanwhile answers 409.\n\n"
            f"py-spy: {tool}\n",
        )

    async def _profile_page(self, request: Request) -> Response:
        seconds, fmt = _profile_parameters(request.url.query)
        return await self._profile(seconds, fmt)

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
        return Response(body, media_type=content_type, headers=headers)


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
    given = params.get("seconds", str(DEFAULT_SECONDS))
    if not (given.isascii() and given.isdigit() and len(given) <= 3 and MIN_SECONDS <= int(given) <= MAX_SECONDS):
        raise HttpError(
            HTTPStatus.BAD_REQUEST,
            f"seconds must be an integer from {MIN_SECONDS} to {MAX_SECONDS}, got {given!r}",
        )
    seconds = int(given)
    fmt = params.get("format", DEFAULT_FORMAT)
    if fmt not in FORMATS:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    return seconds, fmt
