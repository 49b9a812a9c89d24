"""Prometheus metrics of a node, served at /metrics on the admin port in the
text exposition format 0.0.4.

Two halves, so that serving a request stays cheap:
- The request path only counts: the transport keeps one MethodStats per RPC
  method and, per call, adds its latency to a histogram bucket (a bisect and
  a list increment) and, when it fails, one to its status code's count.
- Everything else is gathered when Prometheus scrapes: the registry calls
  each collector, a function that reads a part's own state (the store's
  key count, the CDC publisher's counters, the etcd registration) and
  returns metric families. A subsystem contributes its metrics by
  registering one collector with the node's registry (Registry.register);
  none of them keeps a metric object of its own.

The exposition is written here rather than with prometheus_client: the
counting above is ours anyway (prometheus_client takes a lock per increment),
and the text format is a few lines of formatting.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Upper bounds of the request latency buckets, in seconds (+Inf follows).
LATENCY_BOUNDS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

Kind = Literal["counter", "gauge", "histogram"]


@dataclass
class Family:
    """One metric: its name, type, help line and samples. A sample is (name
    suffix, labels, value): "" for counters and gauges, "_bucket", "_sum" and
    "_count" for histograms."""

    name: str
    kind: Kind
    help: str
    samples: list[tuple[str, Mapping[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> Family:
        self.samples.append(("", labels, value))
        return self


def gauge(name: str, help: str, value: float, **labels: str) -> Family:
    return Family(name, "gauge", help).add(value, **labels)


def counter(name: str, help: str, value: float, **labels: str) -> Family:
    return Family(name, "counter", help).add(value, **labels)


def states(name: str, help: str, current: str, possible: Iterable[str]) -> Family:
    """A gauge per possible state, 1 for the current one and 0 for the others."""
    family = Family(name, "gauge", help)
    for state in possible:
        family.add(1 if state == current else 0, state=state)
    return family


Collector = Callable[[], Iterable[Family]]


class Registry:
    """The node's collectors; exposition() calls each one, in registration order."""

    def __init__(self) -> None:
        self._collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        self._collectors.append(collector)

    def exposition(self) -> bytes:
        lines: list[str] = []
        for collect in self._collectors:
            for family in collect():
                lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
                lines.append(f"# TYPE {family.name} {family.kind}")
                for suffix, labels, value in family.samples:
                    lines.append(f"{family.name}{suffix}{_labels(labels)} {_value(value)}")
        return ("\n".join(lines) + "\n").encode()


class MethodStats:
    """The counts of one RPC method, kept by the transport as calls end.

    A unary call adds its latency to `buckets` (index: the first bound at or
    above it, as bisect_left over LATENCY_BOUNDS gives; the last one is +Inf)
    and `sum`; a streaming call adds one to `streams`. A call that fails adds
    one to `failures` under its status code's name."""

    __slots__ = ("buckets", "failures", "method", "streaming", "streams", "sum")

    def __init__(self, method: str, streaming: bool) -> None:
        self.method = method
        self.streaming = streaming
        self.buckets = [0] * (len(LATENCY_BOUNDS) + 1)
        self.sum = 0.0
        self.streams = 0
        self.failures: dict[str, int] = {}

    def failed(self, code: str) -> None:
        self.failures[code] = self.failures.get(code, 0) + 1


class RequestMetrics:
    """Every served method's MethodStats, and their metric families: by default a
    node's RPCs; fluxkv-gateway's HTTP routes with `prefix` "fluxkv_gateway",
    `label` "route", `ok` "200", `what` "HTTP requests served, by route and status code" and
    `timed` "a request that is not a stream"."""

    def __init__(
        self,
        prefix: str = "fluxkv",
        label: str = "method",
        ok: str = "OK",
        what: str = "RPCs served, by method and gRPC status code (Watch: when it ends)",
        timed: str = "a unary RPC",
    ) -> None:
        self._methods: list[MethodStats] = []
        self._prefix = prefix
        self._label = label
        self._ok = ok
        self._what = what
        self._timed = timed

    def method(self, method: str, streaming: bool) -> MethodStats:
        stats = MethodStats(method, streaming)
        self._methods.append(stats)
        return stats

    def collect(self) -> list[Family]:
        label = self._label
        requests = Family(f"{self._prefix}_requests_total", "counter", f"{self._what}.")
        latency = Family(
            f"{self._prefix}_request_duration_seconds",
            "histogram",
            f"Time to serve {self._timed}, by {label}, in seconds.",
        )
        for stats in self._methods:
            buckets = list(stats.buckets)  # one copy: the counts may move while we read
            total = stats.streams + sum(buckets)
            failed = dict(stats.failures)
            requests.add(total - sum(failed.values()), **{label: stats.method, "code": self._ok})
            for code, count in sorted(failed.items()):
                requests.add(count, **{label: stats.method, "code": code})
            if stats.streaming:
                continue
            cumulative = 0
            for bound, count in zip((*LATENCY_BOUNDS, math.inf), buckets, strict=True):
                cumulative += count
                latency.samples.append(("_bucket", {label: stats.method, "le": _value(bound)}, cumulative))
            latency.samples.append(("_sum", {label: stats.method}, stats.sum))
            latency.samples.append(("_count", {label: stats.method}, cumulative))
        return [requests, latency]


def _value(value: float) -> str:
    if isinstance(value, int) or value.is_integer():
        return str(int(value))
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(value)


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    pairs = ",".join(f'{name}="{_escape_label(value)}"' for name, value in labels.items())
    return "{" + pairs + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")
