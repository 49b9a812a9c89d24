"""Tracing: the settings, a client span as the parent of the node's span (W3C
traceparent over gRPC metadata), parent-based sampling, the CDC publish span
linked to the writes it carries (with a real broker), and a node process
exporting over OTLP/gRPC to a collector."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from opentelemetry import propagate
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler
from opentelemetry.trace import SpanKind, StatusCode

from deploy.private_servers import EtcdServer
from fluxkv import Client, ConditionFailed, config
from fluxkv.obs import tracing
from fluxkv.obs.tracing import Tracing
from fluxkv.proto import kv_pb2 as pb
from tests.conftest import BROKER, Names, running_node, server_process


def node_tracing(exporter: InMemorySpanExporter, ratio: float) -> Tracing:
    """A node's tracing that hands each span to `exporter` as it ends."""
    return Tracing(exporter, ratio, "memory", batch=False)


def client_provider(exporter: InMemorySpanExporter, sampler: Sampler = ALWAYS_ON) -> TracerProvider:
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def of_kind(spans: Sequence[ReadableSpan], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind == kind]


# -- settings ----------------------------------------------------------------


def test_tracing_is_off_without_an_endpoint() -> None:
    assert tracing.from_settings(config.Settings(), {}) is None
    disabled = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_SDK_DISABLED": "true"}
    assert tracing.from_settings(config.Settings(), disabled) is None


@pytest.mark.parametrize(
    ("env", "where"),
    [
        ({"FLUX_JAEGER_ENDPOINT": "jaeger:4317"}, "OTLP/gRPC http://jaeger:4317"),  # Flux-KV's: plaintext
        ({"FLUX_JAEGER_ENDPOINT": "https://collector:4317"}, "OTLP/gRPC https://collector:4317"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4317"}, "OTLP/gRPC http://otel:4317"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4317", "FLUX_JAEGER_ENDPOINT": "jaeger:4317"},
            "OTLP/gRPC http://jaeger:4317",
        ),
    ],
)
def test_an_endpoint_turns_tracing_on(env: dict[str, str], where: str) -> None:
    settings = config.load({}, {k: v for k, v in env.items() if k.startswith("FLUX_")})
    on = tracing.from_settings(settings, env)
    assert on is not None and on.where == where and on.sample_ratio == 0.1


def test_the_sample_ratio_setting() -> None:
    assert config.load({}, {"FLUX_TRACE_SAMPLE_RATIO": "1"}).trace_sample_ratio == 1.0
    with pytest.raises(
        config.ConfigError, match=r"invalid FLUX_TRACE_SAMPLE_RATIO: expected a number from 0\.0 to 1\.0"
    ):
        config.load({}, {"FLUX_TRACE_SAMPLE_RATIO": "1.5"})


# -- propagation and sampling --------------------------------------------------


@pytest.mark.usefixtures("grpc_server")
async def test_a_client_span_is_the_parent_of_the_node_span() -> None:
    exporter = InMemorySpanExporter()
    # The node samples none of its own accord: its spans exist because the caller's are sampled.
    async with running_node(tracing=node_tracing(exporter, 0.0)) as (node, _):
        async with Client(node.address, tracer_provider=client_provider(exporter)) as client:
            await client.set("k", b"v")
            with pytest.raises(ConditionFailed):
                await client.set("k", b"w", expect_revision=0)
    spans = exporter.get_finished_spans()
    clients, servers = of_kind(spans, SpanKind.CLIENT), of_kind(spans, SpanKind.SERVER)
    assert len(clients) == len(servers) == 2
    for client_span, server_span in zip(clients, servers, strict=True):
        assert client_span.name == server_span.name == "fluxkv.v1.KV/Set"
        assert server_span.parent is not None and server_span.parent.is_remote
        assert server_span.parent.span_id == client_span.context.span_id
        assert server_span.context.trace_id == client_span.context.trace_id
        assert server_span.attributes is not None and client_span.attributes is not None
        assert server_span.attributes["rpc.system"] == client_span.attributes["rpc.system"] == "grpc"
        assert server_span.attributes["rpc.service"] == "fluxkv.v1.KV" and server_span.attributes["rpc.method"] == "Set"
        assert client_span.attributes["server.port"] == node.port
        assert server_span.resource.attributes["service.name"] == "fluxkv"
        assert server_span.resource.attributes["service.instance.id"] == node.node_id
    ok, refused = servers
    assert ok.attributes is not None and ok.attributes["rpc.grpc.status_code"] == 0
    assert (
        refused.attributes is not None
        and refused.attributes["rpc.grpc.status_code"] == grpc.StatusCode.ABORTED.value[0]
    )
    assert refused.status.status_code is StatusCode.UNSET  # a failed condition is the caller's error, not the node's
    assert clients[1].status.status_code is StatusCode.ERROR


@pytest.mark.usefixtures("grpc_server")
async def test_the_ratio_decides_only_for_calls_without_a_caller_decision() -> None:
    exporter = InMemorySpanExporter()
    async with running_node(tracing=node_tracing(exporter, 1.0)) as (node, kv):
        await kv.Set(pb.SetRequest(key="plain", value=b"v"))  # no traceparent: the ratio (all)
        unsampled = client_provider(InMemorySpanExporter(), ALWAYS_OFF)
        async with Client(node.address, tracer_provider=unsampled) as client:
            await client.set("k", b"v")  # the caller decided not to trace it
    [server] = exporter.get_finished_spans()
    assert server.kind == SpanKind.SERVER and server.parent is None
    exporter.clear()
    async with running_node(tracing=node_tracing(exporter, 0.0)) as (_, kv):
        await kv.Set(pb.SetRequest(key="plain", value=b"v"))
    assert exporter.get_finished_spans() == ()


@pytest.mark.usefixtures("grpc_server")
async def test_a_forwarded_call_carries_the_trace_to_the_owner(etcd_server: EtcdServer) -> None:
    exporter = InMemorySpanExporter()
    cluster = {"etcd_endpoints": (etcd_server.endpoint,), "etcd_prefix": f"/fluxkv-test-{uuid.uuid4().hex[:8]}/"}
    async with (
        running_node(tracing=node_tracing(exporter, 0.0), **cluster) as (a, kv_a),
        running_node(tracing=node_tracing(exporter, 0.0), **cluster) as (b, _),
    ):
        assert a.router is not None
        # Each node learns of the other through its etcd watch, which nothing here announces.
        async with asyncio.timeout(30):
            while (key := next((f"k{i}" for i in range(100) if a.router.remote_owner(f"k{i}")), None)) is None:
                await asyncio.sleep(0.05)
        assert a.router.remote_owner(key) == b.address
        tracer = client_provider(exporter).get_tracer("test")
        with tracer.start_as_current_span("caller") as caller:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
            await kv_a.Set(pb.SetRequest(key=key, value=b"v"), metadata=tuple(carrier.items()))
    spans = {(s.kind, s.resource.attributes.get("service.instance.id")): s for s in exporter.get_finished_spans()}
    at_a = spans[(SpanKind.SERVER, a.node_id)]
    forward = spans[(SpanKind.CLIENT, a.node_id)]
    at_b = spans[(SpanKind.SERVER, b.node_id)]
    assert at_a.parent is not None and at_a.parent.span_id == caller.get_span_context().span_id
    assert forward.parent is not None and forward.parent.span_id == at_a.context.span_id
    assert at_b.parent is not None and at_b.parent.span_id == forward.context.span_id
    assert {at_a.context.trace_id, forward.context.trace_id, at_b.context.trace_id} == {
        caller.get_span_context().trace_id
    }
    assert forward.name == at_b.name == "fluxkv.v1.KV/Set"


# -- CDC -------------------------------------------------------------------------


@asynccontextmanager
async def traced_cdc_node(names: Names, ratio: float, exporter: InMemorySpanExporter) -> AsyncIterator[Any]:
    cdc = {"rabbitmq_url": BROKER, "cdc_exchange": names.exchange, "cdc_queue": names.queue}
    async with running_node(tracing=node_tracing(exporter, ratio), **cdc) as (node, kv):
        yield node, kv


@pytest.mark.usefixtures("grpc_server")
async def test_the_cdc_publish_span_links_to_the_writes_it_carries(names: Names) -> None:
    exporter = InMemorySpanExporter()
    async with traced_cdc_node(names, 1.0, exporter) as (node, kv):
        for i in range(3):
            await kv.Set(pb.SetRequest(key=f"k{i}", value=b"v"))
        await kv.MultiSet(pb.MultiSetRequest(items=[pb.SetRequest(key=f"m{i}", value=b"v") for i in range(2)]))
        await kv.Delete(pb.DeleteRequest(key="k0"))
        assert await node.cdc.flush(30)
    spans = exporter.get_finished_spans()
    writes = [s for s in of_kind(spans, SpanKind.SERVER) if s.name != "fluxkv.v1.KV/Info"]
    assert [s.name for s in writes] == ["fluxkv.v1.KV/Set"] * 3 + ["fluxkv.v1.KV/MultiSet", "fluxkv.v1.KV/Delete"]
    publishes = of_kind(spans, SpanKind.PRODUCER)
    assert publishes
    linked = [link.context for p in publishes for link in p.links]
    # Each write once (the MultiSet's two changes link to its one span), in revision order.
    assert [c.span_id for c in linked] == [s.context.span_id for s in writes]
    assert all(c.trace_id == s.context.trace_id for c, s in zip(linked, writes, strict=True))
    for publish in publishes:
        assert publish.name == f"publish {names.exchange}"
        assert publish.parent is None and publish.context.trace_flags.sampled
        assert publish.status.status_code is StatusCode.UNSET
        assert publish.attributes is not None
        assert publish.attributes["messaging.system"] == "rabbitmq"
        assert publish.attributes["messaging.destination.name"] == names.exchange
    assert sum(p.attributes["fluxkv.cdc.events"] for p in publishes if p.attributes) == 6
    assert publishes[0].attributes is not None and publishes[0].attributes["fluxkv.cdc.first_revision"] == 1
    assert publishes[-1].attributes is not None and publishes[-1].attributes["fluxkv.cdc.last_revision"] == 6


@pytest.mark.usefixtures("grpc_server")
async def test_unsampled_writes_are_published_without_a_span(names: Names) -> None:
    exporter = InMemorySpanExporter()
    async with traced_cdc_node(names, 0.0, exporter) as (node, kv):
        for i in range(5):
            await kv.Set(pb.SetRequest(key=f"k{i}", value=b"v"))
        assert await node.cdc.flush(30)
        assert node.cdc.counters().confirmed == 5
        assert node.tracing is not None and node.tracing.write_links.take(0, 10**9) == []
    assert exporter.get_finished_spans() == ()


# -- export ----------------------------------------------------------------------


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps what it receives."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.received = asyncio.Event()

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        self.received.set()
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.mark.usefixtures("grpc_server")
async def test_a_node_process_exports_its_spans_over_otlp() -> None:
    collector = Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        env = {"FLUX_JAEGER_ENDPOINT": f"127.0.0.1:{port}", "FLUX_TRACE_SAMPLE_RATIO": "1", "FLUX_NODE_ID": "traced"}
        with server_process(env=env) as node:
            assert f"tracing: spans to OTLP/gRPC http://127.0.0.1:{port}, sampled parent-based, 100%" in node.log
            async with grpc.aio.insecure_channel(node.address) as channel:
                for i in range(3):
                    await channel.unary_unary("/fluxkv.v1.KV/Set")(
                        pb.SetRequest(key=f"k{i}", value=b"v").SerializeToString(), timeout=10
                    )
            assert await asyncio.to_thread(node.stop) == 0  # shutting down exports what is buffered
        spans = [
            (resource.resource, span)
            for request in collector.requests
            for resource in request.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]
        assert [span.name for _, span in spans] == ["fluxkv.v1.KV/Set"] * 3
        attributes = {a.key: a.value.string_value for a in spans[0][0].attributes}
        assert attributes["service.name"] == "fluxkv" and attributes["service.instance.id"] == "traced"
    finally:
        await server.stop(0)
