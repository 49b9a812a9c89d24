"""fluxkv-gateway's HTTP API: Flux-KV's routes and FluxKV's own, a Starlette
app over the client SDK (fluxkv.Client), which sends each key straight to its
owner on the ring, so that no node forwards a gateway's call.

Every /api/v1 request first takes a token from the rate limiter (429 without
one), then passes the circuit breaker (503 while it is open or too many
requests are in flight), then is answered; its outcome is counted by the
breaker (a 5xx is a failure). Errors are mapped in errors.py. The caller's
`Authorization: Bearer` token goes on to the nodes with the calls it makes.

Values are UTF-8 text in JSON by default, as Flux-KV's; `?encoding=base64`
sends and receives them in base64, for binary values.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from bisect import bisect_left
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from http import HTTPStatus
from typing import Any

import grpc
import orjson
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from fluxkv.client import Client, FluxKVError, KeyValue, SetItem, Watch, WatchEvent
from fluxkv.config import Settings
from fluxkv.gateway import errors
from fluxkv.gateway.breaker import CircuitBreaker, State
from fluxkv.gateway.coalesce import Coalescer
from fluxkv.gateway.errors import ApiError
from fluxkv.gateway.openapi import document
from fluxkv.gateway.rate_limit import TokenBucket
from fluxkv.obs.metrics import CONTENT_TYPE, LATENCY_BOUNDS, Family, Registry, RequestMetrics, counter, gauge, states
from fluxkv.obs.tracing import Tracing
from fluxkv.version import __version__

log = logging.getLogger("fluxkv.gateway")
access = logging.getLogger("fluxkv.gateway.access")

Handler = Callable[[Request], Awaitable[Response]]
Endpoint = Handler  # a handler with the rate limit, the breaker, metrics, tracing and the access log around it
Encode = Callable[[bytes, str], str]

JSON = "application/json"
WATCH_PING_S = 15  # a comment line on an idle watch, so that proxies keep the connection
DEFAULT_SCAN_LIMIT = 100


def ok(body: object) -> Response:
    return Response(orjson.dumps(body), media_type=JSON)


class Gateway:
    """The app (`.app`) and its state: the rate limiter, the breaker, the reads
    in flight and the metrics. The client is the caller's, open while the app serves."""

    def __init__(self, client: Client, settings: Settings, tracing: Tracing | None = None) -> None:
        self.client = client
        self._timeout = settings.gateway_timeout_s
        self._max_body = settings.gateway_max_body_bytes
        self._max_scan = settings.max_batch_items
        self._tracing = tracing
        self._access_log = settings.gateway_access_log
        self.limiter = TokenBucket(settings.gateway_rate_limit, settings.gateway_rate_burst)
        self.breaker = CircuitBreaker(
            min_requests=settings.gateway_breaker_min_requests,
            failure_ratio=settings.gateway_breaker_failure_ratio,
            window_s=settings.gateway_breaker_window_s,
            open_s=settings.gateway_breaker_open_s,
            max_in_flight=settings.gateway_max_in_flight,
        )
        self.reads: Coalescer[KeyValue | None] = Coalescer()
        self._closing = asyncio.Event()
        self._watches = 0
        self.requests = RequestMetrics(
            "fluxkv_gateway",
            "route",
            "200",
            "HTTP requests served, by route and status code (a watch: when it is set up)",
            "a request that is not a watch",
        )
        self.registry = Registry()
        self.registry.register(self.requests.collect)
        self.registry.register(self._collect)
        self._openapi = orjson.dumps(document(settings))
        endpoints: dict[str, dict[str, Endpoint]] = {}
        for method, path, handler, api, stream in (
            ("GET", "/health", self._health, False, False),
            ("GET", "/metrics", self._metrics, False, False),
            ("GET", "/openapi.json", self._openapi_json, False, False),
            ("GET", "/api/v1/kv", self._get, True, False),
            ("POST", "/api/v1/kv", self._set, True, False),
            ("DELETE", "/api/v1/kv", self._delete, True, False),
            ("POST", "/api/v1/kv/mget", self._multi_get, True, False),
            ("POST", "/api/v1/kv/mset", self._multi_set, True, False),
            ("GET", "/api/v1/scan", self._scan, True, False),
            ("GET", "/api/v1/watch", self._watch, True, True),
        ):
            endpoints.setdefault(path, {})[method] = self._endpoint(method, path, handler, api=api, stream=stream)
        # One route per path, so that a 405's Allow header names every method of the path.
        routes = [Route(path, _by_method(methods), methods=list(methods)) for path, methods in endpoints.items()]
        self.app = Starlette(routes=routes, exception_handlers={HTTPException: _http_exception})

    def close_watches(self) -> None:
        """End every open watch with an `error` event (UNAVAILABLE): the gateway is stopping.
        EventSource clients reconnect, with their Last-Event-ID, to another gateway."""
        self._closing.set()

    # -- the common part of every route

    def _endpoint(self, method: str, path: str, handler: Handler, *, api: bool, stream: bool) -> Endpoint:
        name = f"{method} {path}"
        stats = self.requests.method(name, stream)
        attributes = {"http.request.method": method, "http.route": path}

        async def endpoint(request: Request) -> Response:
            started = time.perf_counter()
            span = None
            if self._tracing is not None:
                span = self._tracing.server_span(name, attributes, list(request.headers.items()), current=True)
            response = await (self._guarded(request, handler) if api else _answer(request, handler))
            status = response.status_code
            if span is not None:
                span.end_http(status)
            elapsed = time.perf_counter() - started
            if stream:
                stats.streams += 1
            else:
                stats.buckets[bisect_left(LATENCY_BOUNDS, elapsed)] += 1
                stats.sum += elapsed
            if status != HTTPStatus.OK:
                stats.failed(str(status))
            if self._access_log:
                _log_access(request, status, elapsed)
            return response

        return endpoint

    async def _guarded(self, request: Request, handler: Handler) -> Response:
        """The rate limit, then the breaker, then the handler; the breaker counts the outcome."""
        if not self.limiter.take():
            return errors.rate_limited(self.limiter.rate).response()
        breaker = self.breaker
        if not breaker.admit():
            if breaker.in_flight >= breaker.max_in_flight:
                detail = f"{breaker.in_flight} requests in flight, FLUX_GATEWAY_MAX_IN_FLIGHT's limit"
            else:
                detail = "the nodes failed too often: trying again shortly"
            return errors.breaker_open(breaker.open_s, detail).response()
        response = None
        try:
            response = await _answer(request, handler)
        finally:  # a request cancelled with its connection counts as no failure of the nodes
            breaker.done(failed=response is not None and response.status_code >= HTTPStatus.INTERNAL_SERVER_ERROR)
        return response

    def _node(self, request: Request) -> Client:
        """The client that passes the caller's token on (the gateway's own when it sends none)."""
        authorization = request.headers.get("authorization")
        if authorization is None:
            return self.client
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                HTTPStatus.UNAUTHORIZED,
                "the Authorization header must be 'Bearer <token>'",
                grpc.StatusCode.UNAUTHENTICATED.name,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return self.client.with_token(token.strip())

    # -- routes outside the API

    async def _health(self, request: Request) -> Response:
        return ok(
            {
                "status": "ok",
                "version": __version__,
                "nodes": len(self.client.nodes),
                "breaker": self.breaker.state.value,
            }
        )

    async def _metrics(self, request: Request) -> Response:
        return Response(self.registry.exposition(), media_type=CONTENT_TYPE)

    async def _openapi_json(self, request: Request) -> Response:
        return Response(self._openapi, media_type=JSON)

    # -- single keys

    async def _get(self, request: Request) -> Response:
        key = _key_parameter(request)
        encode = _encoding(request)
        client = self._node(request)
        found = await self.reads.do(
            key, request.headers.get("authorization"), lambda: client.get(key, timeout=self._timeout)
        )
        if found is None:
            raise errors.not_found(key)
        return ok(_key_value(found, encode))

    async def _set(self, request: Request) -> Response:
        decode = _decoding(request)
        body = await self._json_object(request)
        key = _text_field(body, "key")
        raw = _text_field(body, "value", empty=True)
        value = decode(raw, "value")
        ttl_ms = _int_field(body, "ttl_ms") or 0
        expect = _int_field(body, "expect_revision")
        client = self._node(request)
        self.reads.forget(key)
        try:
            revision = await client.set(key, value, ttl_ms, expect, timeout=self._timeout)
        finally:
            self.reads.forget(key)
        return ok({"message": "success", "key": key, "value": raw, "revision": revision})

    async def _delete(self, request: Request) -> Response:
        key = _key_parameter(request)
        expect = _int_parameter(request, "expect_revision")
        client = self._node(request)
        self.reads.forget(key)
        try:
            outcome = await client.delete(key, expect, timeout=self._timeout)
        finally:
            self.reads.forget(key)
        if not outcome.deleted:
            raise errors.not_found(key)
        return ok({"message": "deleted", "key": key, "revision": outcome.revision})

    # -- many keys

    async def _multi_get(self, request: Request) -> Response:
        encode = _encoding(request)
        body = await self._json_object(request)
        keys = body.get("keys")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            raise errors.bad_request("'keys' must be a list of strings")
        found = await self._node(request).multi_get(keys, timeout=self._timeout)
        items = [
            {"key": key, "found": False} if kv is None else {**_key_value(kv, encode), "found": True}
            for key, kv in zip(keys, found, strict=True)
        ]
        return ok({"items": items})

    async def _multi_set(self, request: Request) -> Response:
        decode = _decoding(request)
        body = await self._json_object(request)
        raw = body.get("items")
        if not isinstance(raw, list):
            raise errors.bad_request("'items' must be a list of objects with 'key' and 'value'")
        items = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise errors.bad_request(f"items[{i}] must be an object with 'key' and 'value'")
            where = f"items[{i}]."
            items.append(
                SetItem(
                    _text_field(item, "key", where),
                    decode(_text_field(item, "value", where, empty=True), f"{where}value"),
                    _int_field(item, "ttl_ms", where) or 0,
                    _int_field(item, "expect_revision", where),
                )
            )
        client = self._node(request)
        for item in items:
            self.reads.forget(item.key)
        try:
            results = await client.multi_set(items, timeout=self._timeout)
        finally:
            for item in items:
                self.reads.forget(item.key)
        return ok(
            {
                "results": [
                    {"key": item.key, "applied": r.applied, "revision": r.revision, "created": r.created}
                    for item, r in zip(items, results, strict=True)
                ]
            }
        )

    # -- every node

    async def _scan(self, request: Request) -> Response:
        encode = _encoding(request)
        prefix = request.query_params.get("prefix", "")
        cursor = request.query_params.get("cursor", "")
        limit = _int_parameter(request, "limit", 1, self._max_scan)
        keys_only = _bool_parameter(request, "keys_only")
        page, cursor = await self._node(request).scan_page(
            prefix,
            cursor,
            limit=limit or DEFAULT_SCAN_LIMIT,
            include_values=not keys_only,
            timeout=self._timeout,
        )
        if keys_only:
            items = [{"key": kv.key, "revision": kv.mod_revision, "ttl_ms": kv.ttl_ms} for kv in page]
        else:
            items = [_key_value(kv, encode) for kv in page]
        return ok({"items": items, "cursor": cursor})

    async def _watch(self, request: Request) -> Response:
        """Server-Sent Events: a `ready` event, then one event per change (`set`,
        `delete`, `expire`). Each event's id holds every node's position, so an
        EventSource that reconnects with Last-Event-ID resumes where it was, on
        every node; an `error` event ends the stream."""
        encode = _encoding(request)
        prefix = request.query_params.get("prefix", "")
        start_revision = _int_parameter(request, "start_revision", 1)
        last_id = request.headers.get("last-event-id")
        client = self._node(request)
        if last_id:
            seen = _parse_watch_id(last_id)
            current = await client.revisions(timeout=self._timeout)
            # A node that joined since that id was sent: from its next change.
            positions = {node: seen.get(node, revision) for node, revision in current.items()}
        elif start_revision:
            positions = {node: start_revision - 1 for node in self.client.nodes}
        else:
            positions = await client.revisions(timeout=self._timeout)
        watch = client.watch(prefix, {node: p + 1 for node, p in positions.items()}, timeout=self._timeout)
        await watch.__aenter__()
        return EventSourceResponse(self._events(watch, positions, encode), ping=WATCH_PING_S)

    async def _events(self, watch: Watch, positions: dict[str, int], encode: Encode) -> AsyncIterator[ServerSentEvent]:
        self._watches += 1
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            yield ServerSentEvent(
                orjson.dumps({"revisions": positions}).decode(), event="ready", id=_watch_id(positions)
            )
            while True:
                step: asyncio.Future[WatchEvent] = asyncio.ensure_future(anext(watch))
                await asyncio.wait((step, closing), return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    step.cancel()
                    stopping = ApiError(
                        HTTPStatus.SERVICE_UNAVAILABLE,
                        "the gateway is shutting down: reconnect with Last-Event-ID",
                        grpc.StatusCode.UNAVAILABLE.name,
                    )
                    yield _error_event(stopping)
                    return
                try:
                    event = step.result()
                except StopAsyncIteration:
                    return
                except FluxKVError as exc:
                    yield _error_event(errors.from_node(exc))
                    return
                positions[event.node] = event.revision
                try:
                    data = _change(event, encode)
                except ApiError as exc:
                    yield _error_event(exc)
                    return
                yield ServerSentEvent(orjson.dumps(data).decode(), event=event.op, id=_watch_id(positions))
        finally:
            closing.cancel()
            self._watches -= 1
            await watch.__aexit__(None, None, None)

    # -- request bodies

    async def _json_object(self, request: Request) -> dict[str, Any]:
        """The body as a JSON object, within FLUX_GATEWAY_MAX_BODY_BYTES."""
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > self._max_body:
            raise _too_large(self._max_body)
        chunks = []
        size = 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > self._max_body:
                    raise _too_large(self._max_body)
                chunks.append(chunk)
        except ClientDisconnect:
            raise errors.bad_request("the client closed the connection before sending the whole body") from None
        try:
            body = orjson.loads(b"".join(chunks))
        except orjson.JSONDecodeError as exc:
            raise errors.bad_request(f"the body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise errors.bad_request(f"the body must be a JSON object, not {_json_type(body)}")
        return body

    def _collect(self) -> list[Family]:
        breaker = self.breaker
        return [
            counter(
                "fluxkv_gateway_rate_limited_total",
                "API requests refused by the rate limit (429).",
                self.limiter.refused,
            ),
            states(
                "fluxkv_gateway_breaker_state",
                "The circuit breaker's state (1 for the current one).",
                breaker.state.value,
                [s.value for s in State],
            ),
            counter("fluxkv_gateway_breaker_opened_total", "Times the circuit breaker opened.", breaker.opened),
            Family(
                "fluxkv_gateway_breaker_refused_total",
                "counter",
                "API requests refused by the circuit breaker (503), by reason.",
            )
            .add(breaker.refused_open, reason="open")
            .add(breaker.refused_busy, reason="in_flight"),
            gauge("fluxkv_gateway_requests_in_flight", "API requests being answered.", breaker.in_flight),
            gauge("fluxkv_gateway_watches", "Watches (Server-Sent Events streams) open.", self._watches),
            counter(
                "fluxkv_gateway_coalesced_reads_total",
                "GETs answered by another GET's call to the node (singleflight).",
                self.reads.shared,
            ),
            gauge("fluxkv_gateway_nodes", "Nodes the gateway routes to.", len(self.client.nodes)),
        ]


def _by_method(endpoints: Mapping[str, Endpoint]) -> Endpoint:
    async def dispatch(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await endpoints[method](request)

    return dispatch


async def _answer(request: Request, handler: Handler) -> Response:
    """The handler's response, or its failure's: an ApiError, a node's error, or (a bug) a 500."""
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except FluxKVError as exc:
        return errors.from_node(exc).response()
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.url.path)
        return ApiError(
            HTTPStatus.INTERNAL_SERVER_ERROR,
            f"the gateway failed: {type(exc).__name__}",
            grpc.StatusCode.INTERNAL.name,
        ).response()


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, a method the route does not serve) in the API's body format."""
    assert isinstance(exc, HTTPException)
    code = grpc.StatusCode.NOT_FOUND if exc.status_code == HTTPStatus.NOT_FOUND else grpc.StatusCode.UNIMPLEMENTED
    message = f"no route {request.url.path}" if exc.status_code == HTTPStatus.NOT_FOUND else str(exc.detail)
    error = ApiError(HTTPStatus(exc.status_code), message, code.name, headers=exc.headers)
    return error.response()


def _log_access(request: Request, status: int, elapsed: float) -> None:
    client = request.client
    peer = f"{client.host}:{client.port}" if client else ""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    access.info(
        '%s "%s %s" %d %.2fms',
        peer,
        request.method,
        target,
        status,
        elapsed * 1000,
        extra={
            "event": "http_request",
            "peer": peer,
            "method": request.method,
            "path": target,
            "status": status,
            "duration_ms": round(elapsed * 1000, 3),
        },
    )


# -- reading requests


def _key_parameter(request: Request) -> str:
    key = request.query_params.get("key")
    if not key:
        raise errors.bad_request("missing query parameter 'key'")
    return key


def _int_parameter(request: Request, name: str, lo: int = 0, hi: int = 2**63 - 1) -> int | None:
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        raise errors.bad_request(f"query parameter '{name}' must be an integer, got {text[:64]!r}") from None
    if not lo <= value <= hi:
        raise errors.bad_request(f"query parameter '{name}' must be from {lo} to {hi}, got {value}")
    return value


def _bool_parameter(request: Request, name: str) -> bool:
    text = request.query_params.get(name, "false").lower()
    if text not in ("true", "false", "1", "0"):
        raise errors.bad_request(f"query parameter '{name}' must be true or false, got {text[:64]!r}")
    return text in ("true", "1")


def _text_field(body: Mapping[str, Any], name: str, where: str = "", *, empty: bool = False) -> str:
    value = body.get(name)
    if value is None:
        raise errors.bad_request(f"missing field '{where}{name}'")
    if not isinstance(value, str):
        raise errors.bad_request(f"field '{where}{name}' must be a string, not {_json_type(value)}")
    if not value and not empty:
        raise errors.bad_request(f"field '{where}{name}' must not be empty")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise errors.bad_request(
            f"field '{where}{name}' holds a lone surrogate (\\u{ord(value[0]):04x}...): not text"
        ) from None
    return value


def _int_field(body: Mapping[str, Any], name: str, where: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():  # JSON has numbers; 5.0 is the integer 5
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**63:
        raise errors.bad_request(f"field '{where}{name}' must be an integer from 0 to 2^63-1, got {value!r:.64}")
    return value


def _json_type(value: object) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _encoding_parameter(request: Request) -> str:
    encoding = request.query_params.get("encoding", "utf8")
    if encoding not in ("utf8", "base64"):
        raise errors.bad_request(f"query parameter 'encoding' must be utf8 or base64, got {encoding[:64]!r}")
    return encoding


def _decoding(request: Request) -> Callable[[str, str], bytes]:
    """How the request's values become bytes (`?encoding=`)."""
    if _encoding_parameter(request) == "utf8":
        return lambda text, _name: text.encode()

    def decode(text: str, name: str) -> bytes:
        try:
            return base64.b64decode(text, validate=True)
        except ValueError:  # binascii.Error, or a character that is not ASCII
            raise errors.bad_request(f"field '{name}' is not base64 (?encoding=base64)") from None

    return decode


def _encoding(request: Request) -> Encode:
    """How values go into answers (`?encoding=`)."""
    if _encoding_parameter(request) == "base64":
        return lambda value, _key: base64.b64encode(value).decode("ascii")

    def text(value: bytes, key: str) -> str:
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise ApiError(
                HTTPStatus.NOT_ACCEPTABLE,
                f"the value of {key!r} is not UTF-8 text: ask with ?encoding=base64",
                grpc.StatusCode.FAILED_PRECONDITION.name,
                key=key,
            ) from None

    return text


def _too_large(limit: int) -> ApiError:
    return ApiError(
        HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
        f"the body is over FLUX_GATEWAY_MAX_BODY_BYTES ({limit} bytes)",
        grpc.StatusCode.RESOURCE_EXHAUSTED.name,
    )


# -- writing answers


def _key_value(kv: KeyValue, encode: Encode) -> dict[str, object]:
    return {"key": kv.key, "value": encode(kv.value, kv.key), "revision": kv.mod_revision, "ttl_ms": kv.ttl_ms}


def _change(event: WatchEvent, encode: Encode) -> dict[str, object]:
    data: dict[str, object] = {"node": event.node, "revision": event.revision, "op": event.op, "key": event.key}
    if event.op == "set":
        data["value"] = encode(event.value, event.key)
        data["expires_at_ms"] = event.expires_at_ms
    data["ts_ms"] = event.ts_ms
    return data


def _error_event(error: ApiError) -> ServerSentEvent:
    return ServerSentEvent(orjson.dumps({**error.body(), "status": int(error.status)}).decode(), event="error")


def _watch_id(positions: Mapping[str, int]) -> str:
    """An event's id: every node's position, `address=revision` joined by commas."""
    return ",".join(f"{node}={revision}" for node, revision in sorted(positions.items()))


def _parse_watch_id(text: str) -> dict[str, int]:
    positions = {}
    for part in text.split(","):
        node, equals, revision = part.rpartition("=")
        if not equals or not node or not revision.isdigit():
            raise errors.bad_request(f"Last-Event-ID is not one of this gateway's watch ids: {text[:200]!r}")
        positions[node] = int(revision)
    return positions
