"""/metrics on the admin port: the exposition parses with Prometheus' own parser,
and its counts are those of the traffic sent (requests by method and status,
latency histograms, the store, CDC with a real broker, etcd with a real etcd)."""

from __future__ import annotations

import asyncio
import math
import uuid

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy.private_servers import EtcdServer
from fluxkv.obs import metrics
from fluxkv.proto import compat_kv_pb2 as cpb
from fluxkv.proto import compat_kv_pb2_grpc
from fluxkv.proto import kv_pb2 as pb
from fluxkv.server.node import Node
from tests.conftest import BROKER, Names, http_get, running_node, server_version

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(node: Node) -> Samples:
    """Every sample of /metrics, by (name, labels)."""
    assert node.admin is not None
    answer = await http_get(node.admin.port, "/metrics")
    assert answer.status == 200
    assert answer.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(answer.text)


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, frozenset(s.labels.items()))
            assert key not in samples, f"sample {key} twice"
            samples[key] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_requests_store_and_process_after_traffic(grpc_server: str) -> None:
    async with running_node(watch_history=2) as (node, kv):
        for i in range(5):
            await kv.Set(pb.SetRequest(key=f"k{i}", value=b"12345"))
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError):
                await kv.Set(pb.SetRequest(key="", value=b"v"))  # INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError):
            await kv.Set(pb.SetRequest(key="k0", value=b"v", expect_revision=0))  # ABORTED
        for _ in range(3):
            await kv.Get(pb.GetRequest(key="k1"))
        await kv.Delete(pb.DeleteRequest(key="k4"))
        await kv.MultiSet(pb.MultiSetRequest(items=[pb.SetRequest(key=f"m{i}", value=b"v") for i in range(3)]))
        # A watch from a revision the history (2 changes) no longer holds ends at once.
        with pytest.raises(grpc.aio.AioRpcError) as watch:
            async for _ in kv.Watch(pb.WatchRequest(start_revision=1)):
                pass
        assert watch.value.code() == grpc.StatusCode.OUT_OF_RANGE
        async with grpc.aio.insecure_channel(node.address) as channel:
            await compat_kv_pb2_grpc.KVServiceStub(channel).Get(cpb.GetRequest(key="k1"))

        samples = await scrape(node)

    def requests(method: str, code: str) -> float:
        return value(samples, "fluxkv_requests_total", method=method, code=code)

    assert requests("fluxkv.v1.KV/Set", "OK") == 5
    assert requests("fluxkv.v1.KV/Set", "INVALID_ARGUMENT") == 2
    assert requests("fluxkv.v1.KV/Set", "ABORTED") == 1
    assert requests("fluxkv.v1.KV/Get", "OK") == 3
    assert requests("fluxkv.v1.KV/Delete", "OK") == 1
    assert requests("fluxkv.v1.KV/MultiSet", "OK") == 1
    assert requests("fluxkv.v1.KV/Watch", "OUT_OF_RANGE") == 1
    assert requests("fluxkv.v1.KV/Watch", "OK") == 0
    assert requests("service.KVService/Get", "OK") == 1
    assert requests("fluxkv.v1.KV/Scan", "OK") == 0
    # The histogram: cumulative buckets up to +Inf, which equals the count of every unary call.
    set_buckets = [
        (float(dict(labels)["le"]), v)
        for (name, labels), v in samples.items()
        if name == "fluxkv_request_duration_seconds_bucket" and ("method", "fluxkv.v1.KV/Set") in labels
    ]
    assert [le for le, _ in set_buckets] == [*metrics.LATENCY_BOUNDS, math.inf]
    counts = [v for _, v in set_buckets]
    assert counts == sorted(counts) and counts[-1] == 8
    assert value(samples, "fluxkv_request_duration_seconds_count", method="fluxkv.v1.KV/Set") == 8
    assert 0 < value(samples, "fluxkv_request_duration_seconds_sum", method="fluxkv.v1.KV/Set") < counts[-1] * 10
    assert not any(
        name.startswith("fluxkv_request_duration") and ("method", "fluxkv.v1.KV/Watch") in labels
        for name, labels in samples
    )
    # The store: k0..k3 and m0..m2, after 5 + 1 + 3 changes.
    assert value(samples, "fluxkv_keys") == 7
    assert value(samples, "fluxkv_data_bytes") == 4 * (2 + 5) + 3 * (2 + 1)
    assert value(samples, "fluxkv_revision") == 9
    assert value(samples, "fluxkv_expired_keys_total") == 0
    assert value(samples, "fluxkv_watchers") == 0
    assert value(samples, "fluxkv_ready") == 1
    assert value(samples, "fluxkv_node_info", node_id=node.node_id, version=node.version, epoch=node.store.epoch) == 1
    assert value(samples, "process_resident_memory_bytes") > 1_000_000
    assert value(samples, "fluxkv_grpc_server_info", server=grpc_server, version=server_version(grpc_server)) == 1
    assert not any(name.startswith(("fluxkv_cdc_", "fluxkv_etcd_")) for name, _ in samples)  # both off


@pytest.mark.usefixtures("grpc_server")
async def test_cdc_counters_with_a_broker(names: Names) -> None:
    cdc = {"rabbitmq_url": BROKER, "cdc_exchange": names.exchange, "cdc_queue": names.queue}
    async with running_node(**cdc) as (node, kv):
        for i in range(20):
            await kv.Set(pb.SetRequest(key=f"k{i}", value=b"v"))
        assert node.cdc is not None and await node.cdc.flush(30)  # published and confirmed
        samples = await scrape(node)
    assert value(samples, "fluxkv_cdc_connection", state="connected") == 1
    assert value(samples, "fluxkv_cdc_connection", state="reconnecting") == 0
    for name in ("queued", "published", "confirmed"):
        assert value(samples, f"fluxkv_cdc_events_{name}_total") == 20
    assert value(samples, "fluxkv_cdc_events_dropped_total") == 0
    assert value(samples, "fluxkv_cdc_queue_events") == 0
    assert value(samples, "fluxkv_cdc_queue_bytes") == 0
    assert value(samples, "fluxkv_cdc_confirmed_revision") == 20


@pytest.mark.usefixtures("grpc_server")
async def test_etcd_registration_with_etcd(etcd_server: EtcdServer) -> None:
    prefix = f"/fluxkv-test-{uuid.uuid4().hex[:8]}/"
    async with running_node(etcd_endpoints=(etcd_server.endpoint,), etcd_prefix=prefix) as (node, _):
        # The node learns of its own registration through its etcd watch, which nothing here announces.
        async with asyncio.timeout(30):
            while value(samples := await scrape(node), "fluxkv_ring_nodes") != 1:
                await asyncio.sleep(0.05)
    assert value(samples, "fluxkv_etcd_registration", state="registered") == 1
    assert value(samples, "fluxkv_etcd_registration", state="lost") == 0
    assert value(samples, "fluxkv_etcd_registrations_total") == 1
    assert value(samples, "fluxkv_etcd_authentications_total") == 0  # no FLUX_ETCD_USERNAME
    assert value(samples, "fluxkv_forwarded_calls_total") == 0


@pytest.mark.usefixtures("grpc_server")
async def test_a_subsystem_adds_its_metrics_through_the_registry() -> None:
    async with running_node() as (node, _):
        # What the append-only file, say, would do when the node builds it.
        node.metrics.register(lambda: [metrics.counter("fluxkv_aof_fsyncs_total", "fsyncs of the AOF.", 3)])
        samples = await scrape(node)
    assert value(samples, "fluxkv_aof_fsyncs_total") == 3


def test_exposition_escapes_labels_and_help() -> None:
    registry = metrics.Registry()
    family = metrics.Family("odd", "gauge", 'help with \\ and\na new line and "quotes"')
    family.add(0.5, text='a "quoted" \\ value\non two lines').add(math.inf, text="inf").add(2**53, text="big")
    registry.register(lambda: [family])
    text = registry.exposition().decode()
    [parsed] = text_string_to_metric_families(text)
    assert parsed.documentation == 'help with \\ and\na new line and "quotes"'
    assert [(s.labels["text"], s.value) for s in parsed.samples] == [
        ('a "quoted" \\ value\non two lines', 0.5),
        ("inf", math.inf),
        ("big", 2**53),
    ]


@pytest.mark.usefixtures("grpc_server")
async def test_append_only_file(tmp_path: object) -> None:
    path = f"{tmp_path}/node.aof"
    async with running_node(aof_filename=path, aof_append_fsync="always") as (node, kv):
        for i in range(20):
            await kv.Set(pb.SetRequest(key=f"k{i}", value=b"v"))
        await kv.RewriteAof(pb.RewriteAofRequest())
        samples = await scrape(node)
        assert value(samples, "fluxkv_aof_state", state="ok") == 1
        assert value(samples, "fluxkv_aof_state", state="failed") == 0
        assert value(samples, "fluxkv_aof_records_written_total") == 20
        assert value(samples, "fluxkv_aof_fsyncs_total") == value(samples, "fluxkv_aof_batches_written_total") >= 1
        assert value(samples, "fluxkv_aof_durable_revision") == 20
        assert value(samples, "fluxkv_aof_rewrites_total") == 1
        assert value(samples, "fluxkv_aof_size_bytes") == (await kv.Info(pb.InfoRequest())).aof.size_bytes
    async with running_node() as (node, _):
        assert not any(name.startswith("fluxkv_aof_") for name, _ in await scrape(node))
