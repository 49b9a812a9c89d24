"""fluxkv-gateway over real HTTP (httpx) in front of real nodes in this process,
each on both gRPC servers: Flux-KV's routes and FluxKV's, each key sent to its
owner, the errors as the issue maps them, the watch's Server-Sent Events and
their resumption, the rate limit, the circuit breaker as nodes stop and come
back, tokens passed on, spans that continue to the nodes, the access log and
the metrics."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from fluxkv import config
from fluxkv.client import StaticNodes
from fluxkv.gateway.app import Gateway
from fluxkv.gateway.errors import BREAKER_OPEN, RATE_LIMITED
from fluxkv.gateway.main import running
from fluxkv.obs.tracing import Tracing
from fluxkv.server.node import Node
from tests.conftest import cluster, eventually, node_whose_writes_wait, settings, write_tokens

pytestmark = pytest.mark.usefixtures("grpc_server")


def gateway_settings(**overrides: object) -> config.Settings:
    defaults = config.Settings(gateway_port=0, shutdown_grace_s=2.0, gateway_timeout_s=5.0)
    return dataclasses.replace(defaults, **overrides)  # type: ignore[arg-type]


@asynccontextmanager
async def gateway(
    addresses: list[str], tracing: Tracing | None = None, **overrides: object
) -> AsyncIterator[tuple[Gateway, httpx.AsyncClient]]:
    async with (
        running(gateway_settings(**overrides), StaticNodes(addresses), tracing) as (gw, server),
        httpx.AsyncClient(base_url=server.url.rstrip("/"), timeout=30) as http,
    ):
        yield gw, http


def sse(text: str) -> list[dict[str, Any]]:
    """Server-Sent Events as {event, id, data}; comments (pings) left out."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        fields: dict[str, Any] = {}
        for line in block.split("\n"):
            name, colon, value = line.partition(":")
            if colon and name:
                fields[name] = value.removeprefix(" ")
        if "event" in fields:
            fields["data"] = orjson.loads(fields["data"])
            events.append(fields)
    return events


class EventStream:
    """An open watch: read() waits for the next event."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def read(self) -> dict[str, Any]:
        fields: dict[str, str] = {}
        async with asyncio.timeout(10):
            async for line in self._lines:
                if not line:
                    if "event" in fields:
                        return {**fields, "data": orjson.loads(fields["data"])}
                    fields = {}
                    continue
                name, colon, value = line.partition(":")
                if colon and name:
                    fields[name] = value.removeprefix(" ")
        raise EOFError("the stream ended")


@asynccontextmanager
async def watching(http: httpx.AsyncClient, query: str = "", **headers: str) -> AsyncIterator[EventStream]:
    async with http.stream("GET", f"/api/v1/watch{query}", headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield EventStream(response)


# -- the routes --------------------------------------------------------------------


async def test_flux_kv_routes_answer_as_its_gateway_did_and_each_key_goes_to_its_owner() -> None:
    async with cluster(3) as c, gateway(c.addresses) as (_gw, http):
        health = await http.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok" and health.json()["nodes"] == 3
        for i in range(60):
            key = f"user:{i}"
            answer = await http.post("/api/v1/kv", json={"key": key, "value": f"v{i}"})
            assert answer.status_code == 200
            body = answer.json()
            assert body == {"message": "success", "key": key, "value": f"v{i}", "revision": body["revision"]}
            stored = c.owner(key).store.get(key)
            assert stored is not None and (stored.value, stored.mod_revision) == (f"v{i}".encode(), body["revision"])
            assert all(n.store.get(key) is None for n in c.nodes if n is not c.owner(key))
            read = await http.get("/api/v1/kv", params={"key": key})
            assert read.status_code == 200
            assert read.json() == {"key": key, "value": f"v{i}", "revision": body["revision"], "ttl_ms": 0}
        assert all(len(n.store) > 0 for n in c.nodes)
        deleted = await http.delete("/api/v1/kv", params={"key": "user:1"})
        assert deleted.status_code == 200
        assert deleted.json() == {"message": "deleted", "key": "user:1", "revision": deleted.json()["revision"]}
        assert c.owner("user:1").store.get("user:1") is None
        missing = await http.get("/api/v1/kv", params={"key": "user:1"})
        assert missing.status_code == 404
        assert missing.json() == {"error": "key 'user:1' not found", "code": "NOT_FOUND", "key": "user:1"}
        assert (await http.delete("/api/v1/kv", params={"key": "user:1"})).status_code == 404


async def test_bad_input_is_a_400_that_says_what_was_wrong_and_nothing_is_written() -> None:
    async with cluster(2) as c, gateway(c.addresses, gateway_max_body_bytes=6000) as (_gw, http):
        cases: list[tuple[httpx.Request, int, str]] = [
            (http.build_request("GET", "/api/v1/kv"), 400, "missing query parameter 'key'"),
            (http.build_request("POST", "/api/v1/kv", content=b"{"), 400, "the body is not JSON"),
            (http.build_request("POST", "/api/v1/kv", json=[1]), 400, "must be a JSON object, not an array"),
            (http.build_request("POST", "/api/v1/kv", json={"value": "v"}), 400, "missing field 'key'"),
            (http.build_request("POST", "/api/v1/kv", json={"key": "k"}), 400, "missing field 'value'"),
            (http.build_request("POST", "/api/v1/kv", json={"key": 5, "value": "v"}), 400, "'key' must be a string"),
            (http.build_request("POST", "/api/v1/kv", json={"key": "", "value": "v"}), 400, "must not be empty"),
            (
                http.build_request("POST", "/api/v1/kv", json={"key": "k", "value": "v", "ttl_ms": -1}),
                400,
                "'ttl_ms' must be an integer from 0",
            ),
            (
                http.build_request("POST", "/api/v1/kv", json={"key": "k", "value": "v", "ttl_ms": True}),
                400,
                "'ttl_ms' must be an integer",
            ),
            (
                http.build_request("POST", "/api/v1/kv?encoding=base64", json={"key": "k", "value": "!!"}),
                400,
                "field 'value' is not base64",
            ),
            (
                http.build_request("POST", "/api/v1/kv?encoding=hex", json={"key": "k", "value": "v"}),
                400,
                "'encoding' must be utf8 or base64",
            ),
            (
                http.build_request("POST", "/api/v1/kv", json={"key": "k" * 7000, "value": "v"}),
                413,
                "over FLUX_GATEWAY_MAX_BODY_BYTES (6000 bytes)",
            ),
            (  # a node's limit: its message
                http.build_request("POST", "/api/v1/kv", json={"key": "k" * 4100, "value": "v"}),
                400,
                "FLUX_MAX_KEY_BYTES",
            ),
            (
                http.build_request("POST", "/api/v1/kv/mget", json={"keys": "k"}),
                400,
                "'keys' must be a list of strings",
            ),
            (
                http.build_request("POST", "/api/v1/kv/mset", json={"items": [{"key": "k"}]}),
                400,
                "missing field 'items[0].value'",
            ),
            (http.build_request("GET", "/api/v1/scan?limit=0"), 400, "'limit' must be from 1 to 1000"),
            (http.build_request("GET", "/api/v1/scan?cursor=xyz"), 400, "not a scan cursor"),
            (http.build_request("DELETE", "/api/v1/kv?key=k&expect_revision=x"), 400, "must be an integer"),
            (http.build_request("GET", "/api/v1/watch?start_revision=0"), 400, "'start_revision' must be from 1"),
            (
                http.build_request("GET", "/api/v1/watch", headers={"Last-Event-ID": "nonsense"}),
                400,
                "Last-Event-ID is not one of this gateway's watch ids",
            ),
            (http.build_request("GET", "/api/v1/nothing"), 404, "no route /api/v1/nothing"),
        ]
        for request, status, message in cases:
            answer = await http.send(request)
            assert answer.status_code == status and message in answer.json()["error"], (request.url, answer.text)
            assert answer.headers["content-type"] == "application/json"
            assert set(answer.json()) >= {"error", "code"}
        wrong_method = await http.put("/api/v1/kv")
        assert wrong_method.status_code == 405
        assert set(wrong_method.headers["allow"].split(", ")) == {"GET", "HEAD", "POST", "DELETE"}
        assert sum(len(n.store) for n in c.nodes) == 0
        assert (await http.get("/health")).status_code == 200


async def test_ttl_compare_and_set_and_binary_values() -> None:
    async with cluster(2) as c, gateway(c.addresses) as (_gw, http):
        first = (await http.post("/api/v1/kv", json={"key": "t", "value": "v", "ttl_ms": 60_000})).json()["revision"]
        assert 0 < (await http.get("/api/v1/kv?key=t")).json()["ttl_ms"] <= 60_000
        stale = await http.post("/api/v1/kv", json={"key": "t", "value": "w", "expect_revision": first + 7})
        assert stale.status_code == 409
        assert stale.json()["code"] == "ABORTED" and stale.json()["revision"] == first
        exists = await http.post("/api/v1/kv", json={"key": "t", "value": "w", "expect_revision": 0})
        assert exists.status_code == 409 and exists.json()["revision"] == first
        second = await http.post("/api/v1/kv", json={"key": "t", "value": "w", "expect_revision": first})
        assert second.status_code == 200
        assert (await http.delete(f"/api/v1/kv?key=t&expect_revision={first}")).status_code == 409
        revision = second.json()["revision"]
        assert (await http.delete(f"/api/v1/kv?key=t&expect_revision={revision}")).status_code == 200

        binary = bytes(range(256))
        encoded = base64.b64encode(binary).decode()
        written = await http.post("/api/v1/kv?encoding=base64", json={"key": "bin", "value": encoded})
        assert written.status_code == 200 and written.json()["value"] == encoded
        assert c.owner("bin").store.get("bin").value == binary  # type: ignore[union-attr]
        as_text = await http.get("/api/v1/kv?key=bin")
        assert as_text.status_code == 406 and "?encoding=base64" in as_text.json()["error"]
        assert (await http.get("/api/v1/kv?key=bin&encoding=base64")).json()["value"] == encoded
        unicode = await http.post("/api/v1/kv", json={"key": "ключ", "value": "значение ✓"})
        assert unicode.status_code == 200
        assert (await http.get("/api/v1/kv", params={"key": "ключ"})).json()["value"] == "значение ✓"


async def test_multi_get_multi_set_and_scan_pages_across_the_nodes() -> None:
    async with cluster(3) as c, gateway(c.addresses) as (_gw, http):
        items = [{"key": f"m:{i:03}", "value": f"{i}"} for i in range(250)]
        written = await http.post("/api/v1/kv/mset", json={"items": items})
        assert written.status_code == 200
        results = written.json()["results"]
        assert [r["key"] for r in results] == [i["key"] for i in items]
        assert all(r["applied"] and r["created"] for r in results)
        assert all(c.owner(i["key"]).store.get(i["key"]) is not None for i in items)
        again = await http.post(
            "/api/v1/kv/mset",
            json={"items": [{"key": "m:000", "value": "x", "expect_revision": 0}, {"key": "m:001", "value": "y"}]},
        )
        assert [(r["applied"], r["revision"]) for r in again.json()["results"]] == [
            (False, results[0]["revision"]),
            (True, again.json()["results"][1]["revision"]),
        ]
        read = await http.post("/api/v1/kv/mget", json={"keys": ["m:002", "absent", "m:001"]})
        assert [(i["key"], i["found"], i.get("value")) for i in read.json()["items"]] == [
            ("m:002", True, "2"),
            ("absent", False, None),
            ("m:001", True, "y"),
        ]
        seen: list[str] = []
        cursor = ""
        while True:
            page = await http.get("/api/v1/scan", params={"prefix": "m:", "limit": 40, "cursor": cursor})
            assert page.status_code == 200
            seen += [i["key"] for i in page.json()["items"]]
            cursor = page.json()["cursor"]
            if not cursor:
                break
        assert sorted(seen) == [i["key"] for i in items]
        keys_only = await http.get("/api/v1/scan", params={"prefix": "m:", "keys_only": "true", "limit": 5})
        assert all(set(i) == {"key", "revision", "ttl_ms"} for i in keys_only.json()["items"])


# -- the watch -----------------------------------------------------------------------


async def test_a_watch_streams_every_nodes_changes_and_resumes_from_last_event_id() -> None:
    async with cluster(2) as c, gateway(c.addresses) as (_gw, http):
        keys = [c.key_on(c.nodes[0], "w"), c.key_on(c.nodes[1], "w")]
        async with watching(http, "?prefix=w") as events:
            ready = await events.read()
            assert ready["event"] == "ready" and ready["data"] == {"revisions": {a: 0 for a in c.addresses}}
            for i in range(3):
                await http.post("/api/v1/kv", json={"key": keys[i % 2], "value": f"v{i}"})
            seen = [await events.read() for _ in range(2)]
        assert [(e["event"], e["data"]["key"], e["data"]["value"]) for e in seen] in (
            [("set", keys[0], "v0"), ("set", keys[1], "v1")],
            [("set", keys[1], "v1"), ("set", keys[0], "v0")],
        )
        assert all(e["data"]["node"] == c.owner(e["data"]["key"]).address for e in seen)
        # Disconnected after two events; two more changes, then the third (missed) one and these arrive.
        await http.post("/api/v1/kv", json={"key": "other", "value": "not watched"})
        await http.delete("/api/v1/kv", params={"key": keys[1]})
        await http.post("/api/v1/kv", json={"key": keys[0], "value": "v3", "ttl_ms": 60_000})
        async with watching(http, "?prefix=w", **{"Last-Event-ID": seen[-1]["id"]}) as events:
            assert (await events.read())["event"] == "ready"
            resumed = [await events.read() for _ in range(3)]
        ops = [(e["event"], e["data"]["key"], e["data"].get("value")) for e in resumed]
        assert sorted(ops, key=str) == sorted(
            [("set", keys[0], "v2"), ("delete", keys[1], None), ("set", keys[0], "v3")], key=str
        )
        by_node = [e for e in resumed if e["data"]["key"] == keys[0]]
        assert [e["data"]["value"] for e in by_node] == ["v2", "v3"]  # a node's changes in its order
        assert by_node[1]["data"]["expires_at_ms"] > 0


async def test_a_watch_from_a_revision_gone_from_history_is_410_and_stopping_ends_open_watches() -> None:
    async with cluster(1, watch_history=2) as c, gateway(c.addresses) as (gw, http):
        for i in range(5):
            await http.post("/api/v1/kv", json={"key": f"h{i}", "value": "v"})
        gone = await http.get("/api/v1/watch?start_revision=1")
        assert gone.status_code == 410 and gone.json()["code"] == "OUT_OF_RANGE"
        async with watching(http) as events:
            await events.read()
            gw.close_watches()
            ended = await events.read()
            assert ended["event"] == "error" and ended["data"]["code"] == "UNAVAILABLE"
            with pytest.raises(EOFError):
                await events.read()


# -- limits --------------------------------------------------------------------------


async def test_over_the_rate_limit_is_429_and_health_and_metrics_are_not_limited() -> None:
    async with (
        cluster(1) as c,
        gateway(c.addresses, gateway_rate_limit=0.001, gateway_rate_burst=5) as (_gw, http),
    ):
        statuses = [(await http.get("/api/v1/kv?key=k")).status_code for _ in range(8)]
        assert statuses == [404] * 5 + [429] * 3
        limited = await http.get("/api/v1/kv?key=k")
        assert limited.json()["error"] == RATE_LIMITED and limited.headers["retry-after"] == "1"
        assert [(await http.get("/health")).status_code for _ in range(10)] == [200] * 10
        metrics = await http.get("/metrics")
        assert metric(metrics.text, "fluxkv_gateway_rate_limited", {}) == 4
        assert metric(metrics.text, "fluxkv_gateway_requests", {"route": "GET /api/v1/kv", "code": "429"}) == 4


async def test_the_breaker_opens_while_the_nodes_are_down_and_closes_when_they_are_back() -> None:
    async with (
        cluster(2) as c,
        gateway(c.addresses, gateway_timeout_s=0.3, gateway_breaker_open_s=0.5) as (_gw, http),
    ):
        assert (await http.get("/api/v1/kv?key=k")).status_code == 404
        ports = [n.port for n in c.nodes]
        for node in list(c.nodes):
            await c.stop(node)
        failures = await asyncio.gather(*(http.get(f"/api/v1/kv?key=k{i}") for i in range(10)))
        # Refused connections are UNAVAILABLE; a retry that the 0.3 s deadline overtakes (a loaded machine) is 504.
        assert {(f.status_code, f.json()["code"]) for f in failures} <= {
            (503, "UNAVAILABLE"),
            (504, "DEADLINE_EXCEEDED"),
        }
        assert all(f.json()["error"] != BREAKER_OPEN for f in failures)  # the nodes' failures
        refused = await http.get("/api/v1/kv?key=k")
        assert refused.status_code == 503 and refused.json()["error"] == BREAKER_OPEN
        assert (await http.get("/health")).json()["breaker"] == "open"

        restarted = [Node(settings(port=port)) for port in ports]
        for node in restarted:
            await node.start()
        try:

            async def recovered() -> bool:
                return (await http.get("/api/v1/kv?key=k")).status_code == 404

            await eventually(recovered, "the breaker lets a trial request through and closes")
            assert (await http.get("/health")).json()["breaker"] == "closed"
            text = (await http.get("/metrics")).text
            assert metric(text, "fluxkv_gateway_breaker_opened", {}) >= 1  # again if a trial met a node not up yet
            assert metric(text, "fluxkv_gateway_breaker_refused", {"reason": "open"}) >= 1
        finally:
            for node in restarted:
                await node.stop()


async def test_requests_over_max_in_flight_are_503_a_watch_does_not_count_and_504_past_the_deadline() -> None:
    async with (
        node_whose_writes_wait() as (node, _),
        gateway([node.address], gateway_max_in_flight=2, gateway_timeout_s=1.0) as (gw, http),
    ):
        async with watching(http) as events, watching(http):
            await events.read()
            waiting = [
                asyncio.create_task(http.post("/api/v1/kv", json={"key": f"k{i}", "value": "v"})) for i in range(2)
            ]
            await eventually(lambda: gw.breaker.in_flight == 2, "two writes in flight")
            refused = await http.get("/api/v1/kv?key=k")
            assert refused.status_code == 503 and refused.json()["error"] == BREAKER_OPEN
            assert "FLUX_GATEWAY_MAX_IN_FLIGHT" in refused.json()["detail"]
            late = await asyncio.gather(*waiting)
        # At the deadline the node stops waiting for room (UNAVAILABLE), or the gateway stops waiting for it.
        assert {(r.status_code, r.json()["code"]) for r in late} <= {(503, "UNAVAILABLE"), (504, "DEADLINE_EXCEEDED")}
        assert gw.breaker.in_flight == 0 and gw.breaker.state.value == "closed"  # 2 failures of 2: too few to judge
        assert (await http.get("/api/v1/kv?key=k")).status_code == 404


async def test_a_node_that_never_answers_is_504_at_the_gateways_deadline() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never speaks HTTP/2
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        async with gateway([address], gateway_timeout_s=0.5) as (_gw, http):
            answer = await http.get("/api/v1/kv?key=k")
    assert answer.status_code == 504 and answer.json()["code"] == "DEADLINE_EXCEEDED"


# -- tokens, tracing, the access log, metrics ---------------------------------------------


async def test_the_callers_token_goes_on_to_the_nodes(tmp_path: Path) -> None:
    secrets = write_tokens(tmp_path / "tokens.toml", {"writer": ("write", ["app:"]), "reader": ("read", [])})
    async with cluster(2, auth_tokens_file=str(tmp_path / "tokens.toml")) as c, gateway(c.addresses) as (_gw, http):
        writer = {"Authorization": f"Bearer {secrets['writer']}"}
        reader = {"Authorization": f"Bearer {secrets['reader']}"}
        none = await http.post("/api/v1/kv", json={"key": "app:1", "value": "v"})
        assert none.status_code == 401 and none.json()["code"] == "UNAUTHENTICATED"
        assert none.headers["www-authenticate"] == "Bearer"
        assert (await http.post("/api/v1/kv", json={"key": "app:1", "value": "v"}, headers=writer)).status_code == 200
        outside = await http.post("/api/v1/kv", json={"key": "other", "value": "v"}, headers=writer)
        assert outside.status_code == 403 and "other" in outside.json()["error"]
        read_only = await http.post("/api/v1/kv", json={"key": "app:1", "value": "v"}, headers=reader)
        assert read_only.status_code == 403 and read_only.json()["code"] == "PERMISSION_DENIED"
        assert (await http.get("/api/v1/kv?key=app:1", headers=reader)).json()["value"] == "v"
        basic = await http.get("/api/v1/kv?key=app:1", headers={"Authorization": "Basic dTpw"})
        assert basic.status_code == 401 and "Bearer <token>" in basic.json()["error"]


async def test_spans_continue_from_the_caller_through_the_gateway_to_the_node() -> None:
    gateway_spans, node_spans = InMemorySpanExporter(), InMemorySpanExporter()
    gateway_tracing = Tracing(gateway_spans, 1.0, "memory", batch=False)
    gateway_tracing.start("gateway-test", service="fluxkv-gateway")
    node_tracing = Tracing(node_spans, 1.0, "memory", batch=False)
    node = Node(settings(), node_tracing)
    await node.start()
    try:
        async with gateway([node.address], gateway_tracing) as (_gw, http):
            trace_id = "0af7651916cd43dd8448eb211c80319c"
            caller = f"00-{trace_id}-b7ad6b7169203331-01"
            assert (
                await http.post("/api/v1/kv", json={"key": "k", "value": "v"}, headers={"traceparent": caller})
            ).status_code == 200
    finally:
        await node.stop()
    server = next(s for s in gateway_spans.get_finished_spans() if s.name == "POST /api/v1/kv")
    client = next(s for s in gateway_spans.get_finished_spans() if s.name == "fluxkv.v1.KV/Set")
    on_node = next(s for s in node_spans.get_finished_spans() if s.name == "fluxkv.v1.KV/Set")
    assert f"{server.context.trace_id:032x}" == trace_id
    assert server.kind == trace.SpanKind.SERVER and server.parent is not None
    assert f"{server.parent.span_id:016x}" == "b7ad6b7169203331"
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert on_node.parent is not None and on_node.parent.span_id == client.context.span_id
    assert server.attributes is not None and server.attributes["http.response.status_code"] == 200
    assert server.resource.attributes["service.name"] == "fluxkv-gateway"


@pytest.mark.parametrize("on", [False, True])
async def test_the_access_log_has_a_line_per_request_only_when_on(on: bool, caplog: pytest.LogCaptureFixture) -> None:
    async with cluster(1) as c, gateway(c.addresses, gateway_access_log=on) as (_gw, http):
        with caplog.at_level(logging.INFO, logger="fluxkv.gateway.access"):
            await http.get("/api/v1/kv?key=k")
            await http.post("/api/v1/kv", json={"key": "k", "value": "v"})
    lines = [r for r in caplog.records if r.name == "fluxkv.gateway.access"]
    if not on:
        assert lines == []
        return
    assert [(r.method, r.path, r.status) for r in lines] == [  # type: ignore[attr-defined]
        ("GET", "/api/v1/kv?key=k", 404),
        ("POST", "/api/v1/kv", 200),
    ]
    assert all(r.duration_ms > 0 and r.event == "http_request" for r in lines)  # type: ignore[attr-defined]


async def test_metrics_count_requests_by_route_and_status() -> None:
    async with cluster(1) as c, gateway(c.addresses) as (_gw, http):
        await http.post("/api/v1/kv", json={"key": "k", "value": "v"})
        for _ in range(3):
            await http.get("/api/v1/kv?key=k")
        await http.get("/api/v1/kv?key=absent")
        answer = await http.get("/metrics")
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = answer.text
    assert metric(text, "fluxkv_gateway_requests", {"route": "GET /api/v1/kv", "code": "200"}) == 3
    assert metric(text, "fluxkv_gateway_requests", {"route": "GET /api/v1/kv", "code": "404"}) == 1
    assert metric(text, "fluxkv_gateway_requests", {"route": "POST /api/v1/kv", "code": "200"}) == 1
    assert metric(text, "fluxkv_gateway_request_duration_seconds_count", {"route": "GET /api/v1/kv"}) == 4
    assert metric(text, "fluxkv_gateway_nodes", {}) == 1
    assert metric(text, "fluxkv_gateway_breaker_state", {"state": "closed"}) == 1


def metric(text: str, name: str, labels: dict[str, str]) -> float:
    """The value of the sample `name` with these labels, read with Prometheus' own parser."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (name, f"{name}_total") and sample.labels == labels:
                return float(sample.value)
    raise KeyError(f"no sample {name}{labels}")
