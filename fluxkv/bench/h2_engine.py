"""fluxkv-bench's lean gRPC client: unary calls over HTTP/2, on asyncio's raw
sockets, many streams per connection, at a small part of grpcio's CPU per call
(bench/README.md has the measurements and why it is written this way).

A call is two frames: HEADERS, whose header block is encoded once per method
with hpack as literals that never touch the dynamic table (so the same bytes
serve every stream), and DATA with the gRPC-framed body; the calls made in one
turn of the event loop go out in one write. The answer is checked as a gRPC
client must: the response headers (:status 200, content-type application/grpc),
the status from the trailers (grpc-status, grpc-message) or from a Trailers-Only
response, and the one length-prefixed message, parsed with the method's
generated class. The server's header blocks are decoded by hpack, in order (its
dynamic table changes with them); a block made only of indexed fields leaves the
table as it is, so its meaning is kept and looked up the next time, until a
block that may change the table arrives.

Flow control: DATA waits for the connection's and the stream's send windows
(WINDOW_UPDATE) and is cut at the server's SETTINGS_MAX_FRAME_SIZE; calls beyond
its SETTINGS_MAX_CONCURRENT_STREAMS wait for a stream to end. The receive windows
are the largest allowed, and the connection's is topped up as data arrives.

Failures, by gRPC status as grpc-core counts them: RST_STREAM as gRPC's HTTP/2
protocol maps its error code (REFUSED_STREAM: UNAVAILABLE, CANCEL: CANCELLED,
ENHANCE_YOUR_CALM: RESOURCE_EXHAUSTED, ...; others INTERNAL); a response that is
not gRPC by its HTTP status (404: UNIMPLEMENTED, 503: UNAVAILABLE, ...); after a
GOAWAY, the streams the server did not take fail UNAVAILABLE, the others finish
and new calls go on a new connection; a lost connection fails its calls
UNAVAILABLE; a call past its deadline (also sent as grpc-timeout) is reset and
fails DEADLINE_EXCEEDED; a server that breaks the protocol fails its calls
INTERNAL.
"""

from __future__ import annotations

import asyncio
import math
import os
import ssl
import struct
from collections import deque
from collections.abc import Callable, Iterable
from typing import NamedTuple, cast
from urllib.parse import unquote

import grpc
import hpack
from google.protobuf.message import DecodeError, Message

from fluxkv.version import __version__

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types and flags (RFC 9113, section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20
# Settings (section 6.5.2).
ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 2, 3, 4, 5
# Error codes (section 7).
PROTOCOL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, CANCEL, COMPRESSION_ERROR = 1, 3, 6, 8, 9
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_FRAME = 2**24 - 1
OUR_MAX_FRAME = 1 << 20  # what the server may send us
LAST_STREAM_ID = 2**31 - 1
RECONNECT_BACKOFF_S = 1.0  # after a failed connection attempt, calls fail at once for this long
BLOCK_CACHE = 64  # decoded header blocks kept

_FRAME = struct.Struct(">HBBBL")  # length (24 bits, as 16 + 8), type, flags, stream id
_MESSAGE = struct.Struct(">BL")  # gRPC message prefix: compressed flag, length
_SETTING = struct.Struct(">HL")
_WORD = struct.Struct(">L")

CODE_NAMES: dict[int, str] = {code.value[0]: code.name for code in grpc.StatusCode}
# gRPC's HTTP/2 protocol (PROTOCOL-HTTP2.md, "Errors"): RST_STREAM error code -> status.
RESET_CODES = {7: "UNAVAILABLE", 8: "CANCELLED", 0xB: "RESOURCE_EXHAUSTED", 0xC: "PERMISSION_DENIED"}
# gRPC's http-grpc-status-mapping.md: the status of a response that is not gRPC, by HTTP status.
HTTP_CODES = {
    400: "INTERNAL",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "UNIMPLEMENTED",
    429: "UNAVAILABLE",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "UNAVAILABLE",
}


class Failure(NamedTuple):
    """A call that did not succeed: its status code's name and message."""

    code: str
    message: str


Call = Callable[[bytes], "asyncio.Future[Failure | None]"]  # body -> None on success, else the failure


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME.pack(n >> 8, n & 0xFF, kind, flags, stream) + payload


def grpc_timeout(seconds: float) -> str:
    """The grpc-timeout header's value: at most 8 digits, in the finest unit that fits."""
    for unit, per_s in (("n", 1e9), ("u", 1e6), ("m", 1e3), ("S", 1.0), ("M", 1 / 60)):
        amount = math.ceil(seconds * per_s)
        if amount < 10**8:
            return f"{amount}{unit}"
    return f"{math.ceil(seconds / 3600)}H"


class Method:
    """A unary method on one channel: its HEADERS block (path, authority,
    deadline) and the response's parser."""

    __slots__ = ("_head", "block", "pack", "parse")

    def __init__(
        self,
        authority: str,
        path: str,
        response: type[Message],
        timeout_s: float,
        scheme: str = "http",
        metadata: Iterable[tuple[str, str]] = (),
    ) -> None:
        headers = [
            (":method", "POST"),
            (":scheme", scheme),
            (":path", path),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("grpc-timeout", grpc_timeout(timeout_s)),
            ("user-agent", f"fluxkv-bench/{__version__}"),
            *metadata,
        ]
        # Never indexed: the encoder adds nothing to its dynamic table, so the block means the same on every stream.
        self.block = hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(k, v) for k, v in headers], huffman=False)
        n = len(self.block)
        self._head = _FRAME.pack(n >> 8, n & 0xFF, HEADERS, END_HEADERS, 0)[:5]  # HEADERS' frame header but its stream
        # HEADERS (stream id, block), then DATA's frame header and the message prefix: packed in one call per request.
        self.pack = struct.Struct(f">5sL{n}sHBBBLBL").pack
        self.parse = response.FromString

    def frames(self, stream: int, body: bytes) -> bytes:
        """HEADERS and the start of one DATA frame with END_STREAM (the body follows)."""
        n = len(body) + 5
        return self.pack(self._head, stream, self.block, n >> 8, n & 0xFF, DATA, END_STREAM, stream, 0, len(body))

    def headers_frame(self, stream: int) -> bytes:
        return self._head + _WORD.pack(stream) + self.block


class _Stream:
    """A call: before it is sent (id 0), while it is open, and what came back so far."""

    __slots__ = ("body", "data", "deadline", "future", "id", "method", "pending", "replied", "window")

    def __init__(self, method: Method, body: bytes, future: asyncio.Future[Failure | None], deadline: float) -> None:
        self.method = method
        self.body = body
        self.future = future
        self.deadline = deadline
        self.id = 0
        self.data: list[bytes] = []
        self.replied = False  # the response headers came
        self.window = 0  # send window, while `pending` waits for it
        self.pending = memoryview(b"")  # DATA not sent yet


class _Block(NamedTuple):
    """What a header block says, as far as a gRPC client cares."""

    http_status: int | None
    grpc_content: bool
    grpc_status: int | None
    message: str


def _summary(headers: Iterable[tuple[bytes | str, bytes | str]]) -> _Block:
    """The fields a gRPC client reads, from hpack's raw (bytes) header list."""
    fields = {k: v for k, v in headers if isinstance(k, bytes) and isinstance(v, bytes)}

    def text(name: bytes) -> str | None:
        value = fields.get(name)
        return None if value is None else value.decode("utf-8", "replace")

    status, code = text(b":status"), text(b"grpc-status")
    return _Block(
        int(status) if status and status.isdigit() else None,
        (text(b"content-type") or "").startswith("application/grpc"),
        int(code) if code and code.isdigit() else None,
        unquote(text(b"grpc-message") or ""),
    )


def _only_indexed(block: bytes) -> bool:
    """Whether a header block is made only of indexed fields (RFC 7541, 6.1),
    which leave the decoder's dynamic table as it is."""
    i, n = 0, len(block)
    while i < n:
        first = block[i]
        if not first & 0x80:
            return False
        i += 1
        if first & 0x7F == 0x7F:  # the index goes on in more bytes
            while i < n and block[i] & 0x80:
                i += 1
            i += 1
    return True


def _resolve(future: asyncio.Future[Failure | None], result: Failure | None) -> None:
    if not future.done():  # not cancelled meanwhile (Ctrl-C)
        future.set_result(result)


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection of a Channel and its streams."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._loop = channel.loop
        self._transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = self._loop.create_future()  # the server's first SETTINGS came
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self.accepting = True  # new calls may go on this connection (until GOAWAY, loss or the last stream id)
        self._out: list[bytes] = []
        self._flushing = False
        self._buf = b""
        self._streams: dict[int, _Stream] = {}
        self._next_id = 1
        self._queued: deque[_Stream] = deque()  # over the server's SETTINGS_MAX_CONCURRENT_STREAMS
        self._blocked: list[_Stream] = []  # waiting for send window
        self._send_window = DEFAULT_WINDOW
        self._stream_window = DEFAULT_WINDOW  # a new stream's send window (SETTINGS_INITIAL_WINDOW_SIZE)
        self._max_frame = DEFAULT_MAX_FRAME
        self._max_streams = LAST_STREAM_ID
        self._unacked = 0  # bytes received since the connection's last WINDOW_UPDATE
        self._decoder = hpack.Decoder()
        self._blocks: dict[bytes, _Block] = {}
        self._continued: tuple[int, int, list[bytes]] | None = None  # HEADERS waiting for CONTINUATION
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = self._transport = cast(asyncio.Transport, transport)  # uvloop's is one, not of the class
        settings = _SETTING.pack(ENABLE_PUSH, 0) + _SETTING.pack(INITIAL_WINDOW_SIZE, MAX_WINDOW)
        settings += _SETTING.pack(MAX_FRAME_SIZE, OUR_MAX_FRAME)
        window = frame(WINDOW_UPDATE, 0, 0, _WORD.pack(MAX_WINDOW - DEFAULT_WINDOW))
        tcp.write(PREFACE + frame(SETTINGS, 0, 0, settings) + window)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        reason = f"connection lost ({exc})" if exc else "connection closed"
        self._retire()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        self._fail_all(Failure("UNAVAILABLE", reason))
        if self._timer:
            self._timer.cancel()
        self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        end, pos = len(buf), 0
        unpack, streams = _FRAME.unpack_from, self._streams
        while end - pos >= 9:
            high, low, kind, flags, sid = unpack(buf, pos)
            length = high << 8 | low
            start = pos + 9
            if end - start < length:
                break
            if length > OUR_MAX_FRAME:
                return self._abort(FRAME_SIZE_ERROR, f"a frame of {length} bytes, over SETTINGS_MAX_FRAME_SIZE")
            pos = start + length
            sid &= LAST_STREAM_ID
            if self._continued is not None and kind != CONTINUATION:
                return self._abort(PROTOCOL_ERROR, "a header block without its CONTINUATION")
            if kind == DATA:
                self._unacked += length
                stream = streams.get(sid)
                if stream is not None:
                    if flags & PADDED:
                        stream.data.append(buf[start + 1 : pos - buf[start]])
                    else:
                        stream.data.append(buf[start:pos])
                    if flags & END_STREAM:
                        self._end(stream, Failure("INTERNAL", "the response ended without trailers"))
                    elif not stream.replied:
                        self._reset(stream, Failure("INTERNAL", "DATA before the response headers"))
            elif kind == HEADERS:
                if flags & PADDED:
                    block = buf[start + 1 + (5 if flags & PRIORITY_FLAG else 0) : pos - buf[start]]
                else:
                    block = buf[start + 5 : pos] if flags & PRIORITY_FLAG else buf[start:pos]
                if flags & END_HEADERS:
                    if not self._headers(sid, flags, block):
                        return
                else:
                    self._continued = (sid, flags, [block])
            elif kind == CONTINUATION:
                if self._continued is None or self._continued[0] != sid:
                    return self._abort(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
                self._continued[2].append(buf[start:pos])
                if flags & END_HEADERS:
                    sid, flags, blocks = self._continued
                    self._continued = None
                    if not self._headers(sid, flags, b"".join(blocks)):
                        return
            elif not self._control(kind, flags, sid, buf[start:pos]):
                return
        self._buf = buf[pos:]
        if self._unacked >= MAX_WINDOW // 2:
            self._write(frame(WINDOW_UPDATE, 0, 0, _WORD.pack(self._unacked)))
            self._unacked = 0

    # -- calls ---------------------------------------------------------------------

    def request(self, stream: _Stream) -> None:
        """Send a call now, or once the server takes another stream."""
        if len(self._streams) < self._max_streams and not self._queued:
            self._open(stream)
        else:
            self._queued.append(stream)
        if stream.deadline < self._timer_at:
            self._arm(stream.deadline)

    def _open(self, stream: _Stream) -> None:
        sid = self._next_id
        if sid > LAST_STREAM_ID:  # out of stream ids: the next call opens a new connection
            self._retire()
            self._channel.submit(stream)
            return
        self._next_id = sid + 2
        stream.id = sid
        self._streams[sid] = stream
        body, method = stream.body, stream.method
        n = len(body) + 5
        if n <= self._send_window and n <= self._stream_window and n <= self._max_frame and not self._blocked:
            self._send_window -= n
            self._write(method.frames(sid, body))
            self._write(body)
        else:
            self._write(method.headers_frame(sid))
            stream.pending = memoryview(_MESSAGE.pack(0, len(body)) + body)
            stream.window = self._stream_window
            self._blocked.append(stream)
            self._push()
        stream.body = b""

    def _push(self) -> None:
        """Send the DATA of blocked streams, as far as the windows allow."""
        still = []
        for stream in self._blocked:
            if stream.id not in self._streams:  # failed meanwhile
                continue
            while stream.pending:
                n = min(len(stream.pending), self._send_window, stream.window, self._max_frame)
                if n <= 0:
                    break
                chunk, stream.pending = stream.pending[:n], stream.pending[n:]
                self._send_window -= n
                stream.window -= n
                self._write(frame(DATA, 0 if stream.pending else END_STREAM, stream.id, bytes(chunk)))
            if stream.pending:
                still.append(stream)
        self._blocked = still

    def _headers(self, sid: int, flags: int, block: bytes) -> bool:
        """A complete header block; False if it broke the connection."""
        info = self._blocks.get(block)
        if info is None:
            try:
                info = _summary(self._decoder.decode(block, raw=True))
            except hpack.HPACKError as exc:
                self._abort(COMPRESSION_ERROR, f"a header block hpack cannot decode ({exc})")
                return False
            if not _only_indexed(block):
                self._blocks.clear()  # the dynamic table may have changed: what the kept blocks meant may not hold
            elif len(self._blocks) < BLOCK_CACHE:
                self._blocks[block] = info
        stream = self._streams.get(sid)
        if stream is None:  # reset or expired meanwhile (or never ours): the block only had to be decoded
            return True
        if stream.replied:
            if flags & END_STREAM:
                self._end(stream, self._status(stream, info))
            else:
                self._reset(stream, Failure("INTERNAL", "trailers without END_STREAM"))
            return True
        stream.replied = True
        if info.http_status != 200:
            code = HTTP_CODES.get(info.http_status or 0, "UNKNOWN")
            failure = Failure(code, f"HTTP status {info.http_status} instead of a gRPC response")
        elif not info.grpc_content:
            failure = Failure("UNKNOWN", "a response whose content-type is not application/grpc")
        elif flags & END_STREAM:  # Trailers-Only
            self._end(stream, self._status(stream, info))
            return True
        else:
            return True
        if flags & END_STREAM:
            self._end(stream, failure)
        else:
            self._reset(stream, failure)
        return True

    def _status(self, stream: _Stream, info: _Block) -> Failure | None:
        """A call's outcome from its trailers, and on OK, its one response message."""
        code = info.grpc_status
        if code is None:
            return Failure("UNKNOWN", "no grpc-status in the trailers")
        if code:
            return Failure(CODE_NAMES.get(code, "UNKNOWN"), info.message)
        data = b"".join(stream.data)
        if len(data) < 5:
            return Failure("INTERNAL", "OK without a response message")
        compressed, length = _MESSAGE.unpack_from(data)
        if compressed:
            return Failure("INTERNAL", "a compressed response, which was not asked for")
        if length != len(data) - 5:
            return Failure("INTERNAL", f"{len(data) - 5} bytes of response for a message of {length}")
        try:
            stream.method.parse(data[5:])
        except DecodeError as exc:
            return Failure("INTERNAL", f"the response does not parse ({exc})")
        return None

    def _end(self, stream: _Stream, result: Failure | None) -> None:
        """The stream is over: resolve its call, start a waiting one."""
        del self._streams[stream.id]
        _resolve(stream.future, result)
        if self._queued and len(self._streams) < self._max_streams:
            self._open(self._queued.popleft())
        elif not self.accepting and not self._streams and self._transport:
            self._transport.close()  # drained after GOAWAY

    def _reset(self, stream: _Stream, failure: Failure, error: int = CANCEL) -> None:
        self._write(frame(RST_STREAM, 0, stream.id, _WORD.pack(error)))
        self._end(stream, failure)

    # -- the connection ------------------------------------------------------------

    def _control(self, kind: int, flags: int, sid: int, payload: bytes) -> bool:
        """A frame that is not DATA, HEADERS or CONTINUATION; False if it broke the connection."""
        if kind == SETTINGS:
            if flags & ACK:
                return True
            if len(payload) % 6:
                self._abort(FRAME_SIZE_ERROR, "a SETTINGS frame whose length is not a multiple of 6")
                return False
            for i in range(0, len(payload), 6):
                key, value = _SETTING.unpack_from(payload, i)
                if key == MAX_CONCURRENT_STREAMS:
                    self._max_streams = value
                elif key == INITIAL_WINDOW_SIZE:
                    if value > MAX_WINDOW:
                        self._abort(FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value}")
                        return False
                    for stream in self._blocked:
                        stream.window += value - self._stream_window
                    self._stream_window = value
                elif key == MAX_FRAME_SIZE:
                    if not DEFAULT_MAX_FRAME <= value <= MAX_FRAME:
                        self._abort(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value}")
                        return False
                    self._max_frame = value
            self._write(frame(SETTINGS, ACK, 0))
            if not self.ready.done():
                self.ready.set_result(None)
            while self._queued and len(self._streams) < self._max_streams:
                self._open(self._queued.popleft())
            self._push()
        elif kind == WINDOW_UPDATE:
            increment = _WORD.unpack_from(payload)[0] & LAST_STREAM_ID
            if not sid:
                self._send_window += increment
            elif (updated := self._streams.get(sid)) is not None:
                updated.window += increment
            if self._blocked:
                self._push()
        elif kind == PING:
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            if (reset := self._streams.get(sid)) is not None:
                error = _WORD.unpack_from(payload)[0]
                self._end(reset, Failure(RESET_CODES.get(error, "INTERNAL"), f"RST_STREAM with error code {error}"))
        elif kind == GOAWAY:
            last, error = struct.unpack_from(">LL", payload)
            self._retire()
            debug = payload[8:].decode(errors="replace")
            said = f"GOAWAY with error code {error}" + f" ({debug})" * bool(debug)
            refused = Failure("UNAVAILABLE", f"the server did not take the call: {said}")
            for stream in [s for i, s in self._streams.items() if i > last & LAST_STREAM_ID]:
                self._end(stream, refused)
            if not self._streams and self._transport:
                self._transport.close()
        elif kind == PUSH_PROMISE:
            self._abort(PROTOCOL_ERROR, "PUSH_PROMISE, though SETTINGS_ENABLE_PUSH is 0")
            return False
        return True  # PRIORITY, and frame types this client does not know, are ignored

    def _retire(self) -> None:
        """Take no new calls: those not sent yet go back to the channel (a new connection)."""
        if self.accepting:
            self.accepting = False
            self._channel.retired(self)
        queued, self._queued = self._queued, deque()
        for stream in queued:
            self._channel.submit(stream)

    def _abort(self, error: int, message: str) -> None:
        """The server broke the protocol: GOAWAY, fail every call INTERNAL, close."""
        self._write(frame(GOAWAY, 0, 0, struct.pack(">LL", 0, error)))
        self._flush()
        self._retire()
        self._fail_all(Failure("INTERNAL", f"protocol error: {message}"))
        if self._transport:
            self._transport.close()

    def _fail_all(self, failure: Failure) -> None:
        streams, self._streams = self._streams, {}
        self._blocked = []
        for stream in streams.values():
            _resolve(stream.future, failure)

    def _arm(self, at: float) -> None:
        if self._timer:
            self._timer.cancel()
        self._timer, self._timer_at = self._loop.call_at(at, self._expire), at

    def _expire(self) -> None:
        """Fail the calls past their deadline (those sent are reset); wake again for the next deadline."""
        self._timer, self._timer_at = None, math.inf
        now = self._loop.time()
        late = Failure("DEADLINE_EXCEEDED", "deadline exceeded")
        for stream in [s for s in self._streams.values() if s.deadline <= now]:
            self._reset(stream, late)
        for stream in [s for s in self._queued if s.deadline <= now]:
            self._queued.remove(stream)
            _resolve(stream.future, late)
        soonest = min((s.deadline for s in (*self._streams.values(), *self._queued)), default=math.inf)
        if soonest < math.inf:
            self._arm(soonest)

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        if not self._flushing:
            self._flushing = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        if self._out and self._transport:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def close(self) -> None:
        self._retire()
        if self._transport:
            self._flush()
            self._transport.close()


TLS_SHUTDOWN_TIMEOUT_S = 0.25


class Channel:
    """Unary gRPC calls to one server over one HTTP/2 connection, opened on the
    first call and again after it is lost or the server sends GOAWAY. While no
    connection can be had, calls fail UNAVAILABLE at once, for
    RECONNECT_BACKOFF_S after each failed attempt."""

    def __init__(
        self,
        address: str,
        connect_timeout_s: float,
        tls: ssl.SSLContext | None = None,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> None:
        """`tls`: connect over TLS with this context (its ALPN set to h2 here); `metadata`: sent with every call."""
        self.address = address
        self._tls = tls
        if tls is not None:
            tls.set_alpn_protocols(["h2"])
        self._metadata = tuple(metadata)
        host, _, port = address.rpartition(":")
        self._host, self._port = host.strip("[]"), int(port)
        self._connect_timeout_s = connect_timeout_s
        self.loop = asyncio.get_running_loop()
        self._conn: _Connection | None = None
        self._old: set[_Connection] = set()  # draining after GOAWAY
        self._waiting: list[_Stream] = []
        self._connecting: asyncio.Task[None] | None = None
        self._failure: Failure | None = None
        self._retry_at = 0.0
        self._closing = False

    def method(self, path: str, response: type[Message], timeout_s: float) -> Call:
        """call(body): a Future of None when the call succeeds, else its Failure."""
        scheme = "http" if self._tls is None else "https"
        method = Method(self.address, path, response, timeout_s, scheme, self._metadata)
        loop = self.loop

        def call(body: bytes) -> asyncio.Future[Failure | None]:
            future = loop.create_future()
            stream = _Stream(method, body, future, loop.time() + timeout_s)
            conn = self._conn
            if conn is not None and conn.accepting:
                conn.request(stream)
            else:
                self.submit(stream)
            return future

        return call

    def submit(self, stream: _Stream) -> None:
        """A call for when a connection is open."""
        if self._closing:
            _resolve(stream.future, Failure("CANCELLED", "the channel was closed"))
        elif self._conn is not None and self._conn.accepting:
            self._conn.request(stream)
        elif self._failure is not None and self.loop.time() < self._retry_at:
            self.loop.call_soon(_resolve, stream.future, self._failure)  # in the next turn: a closed loop still yields
        else:
            self._waiting.append(stream)
            if self._connecting is None:
                self._connecting = self.loop.create_task(self._connect())

    def retired(self, conn: _Connection) -> None:
        if self._conn is conn:
            self._conn = None
            self._old.add(conn)
            conn.closed.add_done_callback(lambda _: self._old.discard(conn))

    async def _connect(self) -> None:
        conn = _Connection(self)
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await self.loop.create_connection(
                    lambda: conn,
                    self._host,
                    self._port,
                    ssl=self._tls,
                    server_hostname=self._host if self._tls is not None else None,
                    # A gRPC server need not answer TLS's close_notify: wait this long, not asyncio's 30 s.
                    ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT_S if self._tls is not None else None,
                )
                await conn.ready
        except (OSError, TimeoutError) as exc:
            conn.close()
            if isinstance(exc, TimeoutError):
                reason = f"no connection within {self._connect_timeout_s:g} s"
            else:
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
            self._failure, self._retry_at = Failure("UNAVAILABLE", reason), self.loop.time() + RECONNECT_BACKOFF_S
            waiting, self._waiting = self._waiting, []
            for stream in waiting:
                _resolve(stream.future, self._failure)
            return
        finally:
            self._connecting = None
        self._conn, self._failure = conn, None
        waiting, self._waiting = self._waiting, []
        for stream in waiting:
            conn.request(stream)

    async def close(self) -> None:
        """Close the connections; calls still open fail UNAVAILABLE, those waiting for one CANCELLED."""
        self._closing = True
        if self._connecting is not None:
            self._connecting.cancel()
        waiting, self._waiting = self._waiting, []
        for stream in waiting:
            _resolve(stream.future, Failure("CANCELLED", "the channel was closed"))
        conns = [c for c in (self._conn, *self._old) if c is not None]
        for conn in conns:
            conn.close()
        await asyncio.gather(*(c.closed for c in conns))
