"""fluxkv.bench_h2, fluxkv-bench's lean gRPC client, against HTTP/2 servers that
h2 (python-hyper's implementation, which checks what the client sends: request
headers, flow control, the concurrent stream limit) runs with an answer the test
writes: every way a call can fail is counted by its status, not as a success.
Each test runs on asyncio's event loop and on uvloop's, which fluxkv-bench runs
the lean engine on."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
import uvloop
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import ContinuationFrame, DataFrame, GoAwayFrame, HeadersFrame

from deploy.private_servers import free_port
from fluxkv.bench.h2_engine import Call, Channel, Failure, grpc_timeout
from fluxkv.proto import kv_pb2

SET = "/fluxkv.v1.KV/Set"
RESPONSE = kv_pb2.SetResponse(revision=7, created=True).SerializeToString()
GRPC = [(":status", "200"), ("content-type", "application/grpc")]
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
OnLoop = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=LOOPS)
def on_loop(request: pytest.FixtureRequest) -> OnLoop:
    """Runs a test's coroutine on one event loop, and the test on each of LOOPS in turn."""

    def run(main: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            runner.run(main)

    return run


def message(body: bytes, compressed: int = 0) -> bytes:
    return struct.pack(">BL", compressed, len(body)) + body


def request(size: int = 10) -> bytes:
    return kv_pb2.SetRequest(key="k", value=b"v" * size).SerializeToString()


@dataclass
class Request:
    """A request as the server got it, and the connection to answer it on."""

    peer: Peer
    stream: int
    headers: dict[str, str]
    body: bytes

    def answer(self, *, data: bytes | None = message(RESPONSE), trailers: list[tuple[str, str]] | None = None) -> None:
        """Response headers, a DATA frame (unless None), and trailers (grpc-status 0 unless given)."""
        conn = self.peer.conn
        conn.send_headers(self.stream, GRPC)
        if data is not None:
            conn.send_data(self.stream, data)
        conn.send_headers(self.stream, trailers or [("grpc-status", "0")], end_stream=True)
        self.peer.flush()

    def trailers_only(self, code: int, text: str) -> None:
        self.peer.conn.send_headers(
            self.stream, [*GRPC, ("grpc-status", str(code)), ("grpc-message", text)], end_stream=True
        )
        self.peer.flush()


@dataclass
class Peer:
    """The server's side of one connection."""

    conn: h2.connection.H2Connection
    writer: asyncio.StreamWriter

    def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())


Answer = Callable[[Request], None]


@dataclass
class Server:
    """What the server saw, over all its connections."""

    address: str
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    resets: list[tuple[int, int]] = field(default_factory=list)  # (stream, error code)
    errors: list[BaseException] = field(default_factory=list)
    open_streams: int = 0
    most_open: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)  # set at every event

    async def until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self.changed.wait()
            self.changed.clear()


@asynccontextmanager
async def h2_server(answer: Answer, settings: dict[SettingCodes, int] | None = None) -> AsyncIterator[Server]:
    """An HTTP/2 server on a free port: h2 checks what the client sends, `answer` replies to each request."""
    server = Server("")

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        peer = Peer(h2.connection.H2Connection(config), writer)
        peer.conn.local_settings = h2.settings.Settings(client=False, initial_values=settings or {})
        peer.conn.initiate_connection()
        peer.flush()
        server.connections += 1
        bodies: dict[int, bytes] = {}
        headers: dict[int, dict[str, str]] = {}
        try:
            while data := await reader.read(65536):
                for event in peer.conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        headers[event.stream_id] = {str(k): str(v) for k, v in event.headers or []}
                        bodies[event.stream_id] = b""
                        server.open_streams += 1
                        server.most_open = max(server.most_open, server.open_streams)
                    elif isinstance(event, h2.events.DataReceived):
                        bodies[event.stream_id] += event.data or b""
                        peer.conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id or 0)
                    elif isinstance(event, h2.events.StreamEnded):
                        sid = event.stream_id or 0
                        server.open_streams -= 1
                        got = Request(peer, sid, headers.pop(sid), bodies.pop(sid))
                        server.requests.append(got)
                        answer(got)
                    elif isinstance(event, h2.events.StreamReset):
                        server.resets.append((event.stream_id or 0, int(event.error_code or 0)))
                peer.flush()
                server.changed.set()
        except Exception as exc:  # h2 refused what the client sent: the test fails on it
            server.errors.append(exc)
        finally:
            writer.close()
            server.changed.set()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    server.address = f"127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    try:
        yield server
    finally:
        listener.close()
        await listener.wait_closed()
        assert server.errors == []


@asynccontextmanager
async def channel(address: str, timeout_s: float = 10.0) -> AsyncIterator[Call]:
    ch = Channel(address, 3.0)
    try:
        yield ch.method(SET, kv_pb2.SetResponse, timeout_s)
    finally:
        await ch.close()


def answer_all(req: Request) -> None:
    req.answer()


# -- statuses ---------------------------------------------------------------------


def test_the_status_comes_from_the_trailers_or_a_trailers_only_response(on_loop: OnLoop) -> None:
    async def check() -> None:
        def answer(req: Request) -> None:
            size = len(kv_pb2.SetRequest.FromString(req.body[5:]).value)
            if size == 1:
                req.answer()
            elif size == 2:  # an error status after the response headers, in the trailers
                req.answer(data=None, trailers=[("grpc-status", "3"), ("grpc-message", "bad%20key: %E2%82%AC")])
            else:
                req.trailers_only(5, "not here")

        async with h2_server(answer) as server, channel(server.address) as call:
            assert await call(request(1)) is None
            assert await call(request(2)) == Failure("INVALID_ARGUMENT", "bad key: €")
            assert await call(request(3)) == Failure("NOT_FOUND", "not here")
        got = server.requests[0]
        assert got.body == message(request(1))
        assert got.headers[":path"] == SET and got.headers["te"] == "trailers"
        assert got.headers["content-type"] == "application/grpc" and got.headers["grpc-timeout"] == "10000000u"
        assert got.headers[":authority"] == server.address

    on_loop(check())


@pytest.mark.parametrize(
    ("respond", "failure"),
    [
        (lambda r: r.peer.conn.send_headers(r.stream, [(":status", "503")], end_stream=True), "UNAVAILABLE"),
        (lambda r: r.peer.conn.send_headers(r.stream, [(":status", "404")], end_stream=True), "UNIMPLEMENTED"),
        (
            lambda r: r.peer.conn.send_headers(r.stream, [(":status", "200"), ("content-type", "text/html")], True),
            "UNKNOWN",
        ),
        (lambda r: r.answer(trailers=[("x-other", "1")]), "UNKNOWN"),  # no grpc-status
        (lambda r: r.answer(data=None), "INTERNAL"),  # OK without a message
        (lambda r: r.answer(data=message(b"\xff\xff\xff")), "INTERNAL"),  # does not parse
        (lambda r: r.answer(data=message(RESPONSE, compressed=1)), "INTERNAL"),
        (lambda r: r.answer(data=message(RESPONSE) + message(RESPONSE)), "INTERNAL"),  # two messages
        (lambda r: r.answer(data=message(RESPONSE)[:-1]), "INTERNAL"),  # cut short
        (lambda r: r.peer.conn.reset_stream(r.stream, ErrorCodes.REFUSED_STREAM), "UNAVAILABLE"),
        (lambda r: r.peer.conn.reset_stream(r.stream, ErrorCodes.CANCEL), "CANCELLED"),
        (lambda r: r.peer.conn.reset_stream(r.stream, ErrorCodes.ENHANCE_YOUR_CALM), "RESOURCE_EXHAUSTED"),
        (lambda r: r.peer.conn.reset_stream(r.stream, ErrorCodes.INTERNAL_ERROR), "INTERNAL"),
        (lambda r: r.peer.writer.close(), "UNAVAILABLE"),  # the connection is lost
    ],
)
def test_an_answer_that_is_not_a_grpc_success_fails_by_status(on_loop: OnLoop, respond: Answer, failure: str) -> None:
    async def check() -> None:
        async with h2_server(respond) as server, channel(server.address) as call:
            result = await call(request())
            assert result is not None and result.code == failure, result

    on_loop(check())


def test_a_changed_dynamic_table_changes_what_the_same_block_means(on_loop: OnLoop) -> None:
    # h2's encoder indexes what it sends: "grpc-status: 0" becomes dynamic entry 62, then a
    # "grpc-status: 3" goes in at 62 and pushes it to 63, so the same one-byte block that
    # meant OK now means INVALID_ARGUMENT. A kept decoding of that block must not outlive the change.
    async def check() -> None:
        codes = iter(["0", "0", "0", "3", "3", "3", "0"])
        async with h2_server(lambda r: r.answer(trailers=[("grpc-status", next(codes))])) as server:
            async with channel(server.address) as call:
                results = [await call(request()) for _ in range(7)]
        assert [r.code if r else None for r in results] == [None] * 3 + ["INVALID_ARGUMENT"] * 3 + [None]

    on_loop(check())


# -- flow control, stream limits, connections ------------------------------------


def test_flow_control_and_the_concurrent_stream_limit(on_loop: OnLoop) -> None:
    # Stream windows of 1000 bytes, 2 streams at once, and bodies of 50 KB: each call waits for
    # WINDOW_UPDATEs many times, and 18 of the 20 wait for a stream. h2 fails the connection if
    # the client sends past a window or opens a third stream.
    async def check() -> None:
        settings = {SettingCodes.INITIAL_WINDOW_SIZE: 1000, SettingCodes.MAX_CONCURRENT_STREAMS: 2}
        bodies = [request(50_000 + i) for i in range(20)]
        async with h2_server(answer_all, settings) as server, channel(server.address) as call:
            assert await asyncio.gather(*(call(body) for body in bodies)) == [None] * 20
        assert sorted(r.body for r in server.requests) == sorted(message(b) for b in bodies)
        assert server.most_open == 2 and server.connections == 1

    on_loop(check())


def test_goaway_fails_the_calls_the_server_did_not_take_and_moves_to_a_new_connection(on_loop: OnLoop) -> None:
    async def check() -> None:
        held: list[Request] = []

        def answer(req: Request) -> None:
            if server.connections > 1:
                req.answer()
                return
            held.append(req)
            if len(held) == 3:  # streams 1, 3 and 5: take 1 and 3, refuse 5, then answer 1 and 3
                # GOAWAY as its own frame: h2 sends nothing after a GOAWAY of its own, and 1 and 3 must still end.
                req.peer.writer.write(GoAwayFrame(0, last_stream_id=3).serialize())
                held[0].answer()
                held[1].answer()

        async with h2_server(answer) as server, channel(server.address) as call:
            assert await asyncio.gather(*(call(request()) for _ in range(3))) == [
                None,
                None,
                Failure("UNAVAILABLE", "the server did not take the call: GOAWAY with error code 0"),
            ]
            assert await call(request()) is None
        assert server.connections == 2

    on_loop(check())


def test_a_call_past_its_deadline_is_reset_and_fails_deadline_exceeded(on_loop: OnLoop) -> None:
    async def check() -> None:
        async with h2_server(lambda r: None) as server, channel(server.address, timeout_s=0.2) as call:
            assert await call(request()) == Failure("DEADLINE_EXCEEDED", "deadline exceeded")
            await server.until(lambda: bool(server.resets))
        assert server.resets == [(1, ErrorCodes.CANCEL)]
        assert server.requests[0].headers["grpc-timeout"] == grpc_timeout(0.2) == "200000u"

    on_loop(check())


def test_an_unreachable_server_fails_unavailable_at_once_while_it_stays_down(on_loop: OnLoop) -> None:
    async def check() -> None:
        async with channel(f"127.0.0.1:{free_port()}") as call:
            first = await call(request())
            assert first == Failure("UNAVAILABLE", "Connection refused")
            assert await call(request()) == first

    on_loop(check())


def test_padding_priority_continuation_and_split_data_are_read(on_loop: OnLoop) -> None:
    # Frames h2 does not send by itself, written as they come: the header blocks in HEADERS
    # (padded, with a priority) and CONTINUATION, the message in two padded DATA frames.
    async def check() -> None:
        def answer(req: Request) -> None:
            encoder = hpack.Encoder()  # h2 encodes no block on this connection: the client's decoder sees only these
            head, trailers = encoder.encode(GRPC), encoder.encode([("grpc-status", "0")])
            body = message(RESPONSE)
            sid = req.stream
            frames = [
                HeadersFrame(sid, head[:2], flags=["PADDED", "PRIORITY"], pad_length=3, depends_on=0, stream_weight=15),
                ContinuationFrame(sid, head[2:], flags=["END_HEADERS"]),
                DataFrame(sid, body[:4], flags=["PADDED"], pad_length=7),
                DataFrame(sid, body[4:]),
                HeadersFrame(sid, trailers[:1], flags=["END_STREAM"]),
                ContinuationFrame(sid, trailers[1:], flags=["END_HEADERS"]),
            ]
            req.peer.writer.write(b"".join(f.serialize() for f in frames))

        async with h2_server(answer) as server, channel(server.address) as call:
            assert await call(request()) is None

    on_loop(check())
