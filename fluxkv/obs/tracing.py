"""Tracing with OpenTelemetry, exported over OTLP/gRPC, on only when an
endpoint is set (FLUX_JAEGER_ENDPOINT, else OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
or OTEL_EXPORTER_OTLP_ENDPOINT). Off, the node builds no tracer provider and
the request path checks one `is None`.

- Every RPC the node serves is a SERVER span whose parent is the caller's
  span, read from the W3C `traceparent` of the call's metadata (through the
  global propagator, W3C trace context unless OTEL_PROPAGATORS says more).
- Sampling is parent-based: a call whose caller decided is traced as the
  caller said; a call without a caller's decision is traced at
  FLUX_TRACE_SAMPLE_RATIO. The transport decides the latter itself and gives
  the calls it does not trace a non-recording span of fresh ids (what the SDK
  would make, at a third of its cost), so that what they call carries the
  decision on.
- The CDC publisher batches change records; a batch's PRODUCER span links to
  the spans of the writes it carries. The store's hot path is left alone:
  WriteLinks, a change sink attached only with tracing and CDC both on,
  remembers the span context of a write by revision, and only for sampled
  writes, in a bounded map the publisher empties batch by batch. A publish
  span is made only for a batch that carries a sampled write, and is sampled
  because of that link.
- Calls a node makes (forwarding a key to its owner) and the client SDK's
  calls are CLIENT spans that send their context along
  (fluxkv/rpc/spans.py, which needs only OpenTelemetry's API).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Mapping, Sequence
from contextvars import Token
from typing import NamedTuple

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)
from opentelemetry.util.types import Attributes

from fluxkv.config import Settings
from fluxkv.core.changes import ChangeRecord
from fluxkv.obs.metrics import Family, counter
from fluxkv.rpc.spans import METADATA, Metadata
from fluxkv.version import __version__

log = logging.getLogger("fluxkv.tracing")

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# Sampled writes remembered for the CDC publish spans (the oldest go first).
WRITE_LINKS = 4096
# Links on one publish span (the SDK's default limit).
MAX_LINKS = 128
SHUTDOWN_TIMEOUT_S = 5.0
# Status codes that make a SERVER span an error (OpenTelemetry's gRPC conventions).
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


# A call not traced: the flags the SDK gives such a span (random trace id, not sampled).
_NOT_SAMPLED = TraceFlags(TraceFlags.DEFAULT | TraceFlags.RANDOM_TRACE_ID)
_ROOT = Context()


class _RootSampler(TraceIdRatioBased):
    """For spans without a parent: a SERVER span only exists once the
    transport sampled its call at the ratio (Tracing.server_span); a span with
    a sampled link (a CDC publish that carries sampled writes) is sampled;
    any other by trace id ratio."""

    def should_sample(
        self,
        parent_context: Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        if kind is SpanKind.SERVER or (links and any(link.context.trace_flags.sampled for link in links)):
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes)
        return super().should_sample(parent_context, trace_id, name, kind, attributes, links, trace_state)

    def get_description(self) -> str:
        return f"FluxKVRoot{{{self.rate}}}"


def sampler(ratio: float) -> ParentBased:
    """ParentBased(TraceIdRatioBased(ratio)) as the node applies it (see _RootSampler)."""
    return ParentBased(_RootSampler(ratio))


class WriteLinks:
    """A change sink: the span context of each sampled write, by revision, for
    the CDC publish span of the batch that carries it. Writes that are not
    sampled (and expiries, which no call makes) cost a context lookup."""

    def __init__(self, limit: int = WRITE_LINKS) -> None:
        self._limit = limit
        self._by_revision: dict[int, SpanContext] = {}  # insertion order is revision order
        self.dropped = 0  # forgotten because the map was full

    def append(self, record: ChangeRecord) -> None:
        span_context = trace.get_current_span().get_span_context()
        if span_context.trace_flags.sampled:
            by_revision = self._by_revision
            by_revision[record.revision] = span_context
            if len(by_revision) > self._limit:
                del by_revision[next(iter(by_revision))]
                self.dropped += 1

    def take(self, first: int, last: int) -> list[SpanContext]:
        """The distinct span contexts of the writes from `first` to `last`, in
        order; forgets those and every older one (dropped CDC events')."""
        found: dict[int, SpanContext] = {}
        by_revision = self._by_revision
        while by_revision:
            revision = next(iter(by_revision))
            if revision > last:
                break
            span_context = by_revision.pop(revision)
            if revision >= first:
                found.setdefault(span_context.span_id, span_context)
        return list(found.values())


class ServerSpan(NamedTuple):
    span: Span
    token: Token[Context] | None  # the attached context, for calls whose handler runs in it

    def end(self, status: grpc.StatusCode) -> None:
        if self.token is not None:
            otel_context.detach(self.token)
        span = self.span
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", status.value[0])
            if status in _SERVER_ERRORS:
                span.set_status(Status(StatusCode.ERROR, status.name))
        span.end()

    def end_http(self, status: int) -> None:
        """End the span of an HTTP request (fluxkv-gateway's) that was answered with `status`."""
        if self.token is not None:
            otel_context.detach(self.token)
        span = self.span
        if span.is_recording():
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR, str(status)))
        span.end()


class Tracing:
    """A node's tracing: spans go to `exporter`, sampled parent-based at
    `sample_ratio`. start() builds the tracer provider once the node has its
    id; nothing is traced before. `batch=False` exports each span as it ends
    (for tests)."""

    def __init__(self, exporter: SpanExporter, sample_ratio: float, where: str, *, batch: bool = True) -> None:
        self._exporter = exporter
        self.sample_ratio = sample_ratio
        self.where = where
        self._batch = batch
        self._provider: TracerProvider | None = None
        self.tracer: trace.Tracer = trace.NoOpTracer()
        self.write_links = WriteLinks()
        self._ids = RandomIdGenerator()
        self._context_fields: set[str] = set()  # the metadata keys that carry a caller's context

    @property
    def provider(self) -> TracerProvider | None:
        """The tracer provider, once started: a client SDK in the same process makes its spans with it."""
        return self._provider

    def start(self, node_id: str, service: str = "fluxkv") -> None:
        """Build the tracer provider; `service` names the program (fluxkv-gateway's is "fluxkv-gateway")."""
        resource = Resource.create(
            {"service.name": service, "service.version": __version__, "service.instance.id": node_id}
        )
        # The node shuts the provider down itself, within a deadline.
        self._provider = TracerProvider(sampler=sampler(self.sample_ratio), resource=resource, shutdown_on_exit=False)
        processor = BatchSpanProcessor(self._exporter) if self._batch else SimpleSpanProcessor(self._exporter)
        self._provider.add_span_processor(processor)
        self.tracer = self._provider.get_tracer("fluxkv", __version__)
        self._context_fields = propagate.get_global_textmap().fields
        log.info(
            "tracing: spans to %s, sampled parent-based, %g%% of calls without a caller's decision",
            self.where,
            self.sample_ratio * 100,
            extra={"event": "tracing", "endpoint": self.where},
        )

    def server_span(
        self, name: str, attributes: Mapping[str, str], metadata: Metadata | None, *, current: bool
    ) -> ServerSpan:
        """Start the SERVER span of a call, child of the caller's span in
        `metadata`, else sampled at the ratio; `current` makes it the current
        span of the handler."""
        fields = self._context_fields
        if metadata and any(key in fields for key, _ in metadata):
            parent = propagate.extract(metadata, getter=METADATA)
            span = self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        elif random.random() < self.sample_ratio:
            parent = _ROOT
            span = self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
        else:
            parent = _ROOT
            ids = self._ids
            span = NonRecordingSpan(
                SpanContext(ids.generate_trace_id(), ids.generate_span_id(), is_remote=False, trace_flags=_NOT_SAMPLED)
            )
        token = otel_context.attach(trace.set_span_in_context(span, parent)) if current else None
        return ServerSpan(span, token)

    def publish_span(self, name: str, links: Sequence[SpanContext], attributes: Mapping[str, str | int]) -> Span:
        """A PRODUCER span, a root, that links to the writes it carries."""
        return self.tracer.start_span(
            name,
            context=_ROOT,
            kind=SpanKind.PRODUCER,
            links=[Link(c) for c in links[:MAX_LINKS]],
            attributes={**attributes, "fluxkv.cdc.linked_writes": len(links)},
        )

    def collect(self) -> list[Family]:
        """Tracing's metrics, for the node's registry (with CDC on)."""
        return [
            counter(
                "fluxkv_trace_write_links_dropped_total",
                f"Sampled writes whose CDC publish span could not link to them (over {WRITE_LINKS} waiting).",
                self.write_links.dropped,
            )
        ]

    async def shutdown(self) -> None:
        """Export the spans still buffered, within SHUTDOWN_TIMEOUT_S."""
        provider = self._provider
        if provider is None:
            return
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def finished() -> None:
            if not done.done():
                done.set_result(None)

        def run() -> None:
            provider.shutdown()
            try:
                loop.call_soon_threadsafe(finished)
            except RuntimeError:  # the loop has closed: nobody waits any more
                pass

        # A thread of its own (not the loop's executor, which asyncio.run waits for):
        # an unreachable collector must not hold the exit past the deadline.
        threading.Thread(target=run, name="fluxkv-trace-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done, SHUTDOWN_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                "shutdown: spans not exported within %.0f s are lost (%s)",
                SHUTDOWN_TIMEOUT_S,
                self.where,
                extra={"event": "shutdown_traces_lost"},
            )


def from_settings(settings: Settings, environ: Mapping[str, str]) -> Tracing | None:
    """The node's Tracing: OTLP/gRPC to FLUX_JAEGER_ENDPOINT (without a scheme,
    plaintext, as Flux-KV's jaeger:4317), else to the standard variables'
    endpoint; None when neither is set, or OTEL_SDK_DISABLED=true."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    endpoint = settings.otlp_endpoint
    if endpoint and "://" not in endpoint:
        endpoint = "http://" + endpoint
    where = endpoint or next((environ[v] for v in ENDPOINT_VARIABLES if environ.get(v)), "")
    if not where:
        return None
    # Imported here: a node without tracing never loads the exporter.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    # With no endpoint of ours, the exporter reads the standard variables itself.
    return Tracing(OTLPSpanExporter(endpoint=endpoint or None), settings.trace_sample_ratio, f"OTLP/gRPC {where}")
