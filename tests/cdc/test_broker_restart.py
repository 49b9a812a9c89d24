"""CDC through a broker that dies: a private RabbitMQ node is killed (SIGKILL)
in the middle of a load of sets, deletes and expiries and started again;
every acknowledged write and every expiry must then be in the queue, in both
formats (with flux-kv, read as Flux-KV's consumer reads it). Also: writes
blocked by a full queue go through once the broker comes back."""

from __future__ import annotations

import asyncio
import logging

import pytest

from deploy.private_servers import RabbitBroker
from fluxkv.core.changes import Op
from fluxkv.proto import kv_pb2 as pb
from tests.cdc.test_publisher import DECODERS, EXPIRY, FORMATS, Change, deduplicated, drain, ttl_key, write_mixed
from tests.conftest import Names, running_node

pytestmark = pytest.mark.usefixtures("grpc_server")

QUEUE = Names("flux_kv_events", "flux_cdc_file_logger")


@pytest.mark.parametrize("cdc_format", FORMATS)
async def test_no_acknowledged_write_is_lost_when_the_broker_is_killed_and_restarted(
    rabbit_broker: RabbitBroker, caplog: pytest.LogCaptureFixture, cdc_format: str
) -> None:
    caplog.set_level(logging.INFO, logger="fluxkv")
    acked: dict[int, Change] = {}
    milestones = {300: asyncio.Event(), 900: asyncio.Event()}
    stop = asyncio.Event()
    settings = {
        "rabbitmq_url": rabbit_broker.url,
        "cdc_linger_ms": 2,
        "cdc_flush_timeout_s": 60.0,
        "cdc_format": cdc_format,
    }
    async with running_node(**settings) as (node, kv):

        async def writer(w: int) -> None:
            i = 0
            while not stop.is_set():
                revision, change = await write_mixed(kv, f"w{w}-", i)
                acked[revision] = change
                for count, reached in milestones.items():
                    # The broker is killed once the publisher is connected
                    # (it has confirms), so that it really loses the broker.
                    if len(acked) >= count and node.cdc is not None and node.cdc.confirmed:
                        reached.set()
                i += 1

        writers = [asyncio.create_task(writer(w)) for w in range(4)]
        await milestones[300].wait()
        await asyncio.to_thread(rabbit_broker.kill)
        await asyncio.to_thread(rabbit_broker.start)
        await milestones[900].wait()
        stop.set()
        await asyncio.gather(*writers)
        await asyncio.sleep(0.01)  # let the last TTLs pass; reading a key then expires it if the node has not
        expiring = sorted(key for _, key, _ in acked.values() if ttl_key(key))
        for key in expiring:
            assert not (await kv.Get(pb.GetRequest(key=key))).found
        final = node.store.revision
    # The node stopped: it published and the broker confirmed everything.
    assert "CDC lost the broker" in caplog.text
    assert "the broker confirmed every CDC event" in caplog.text
    events = deduplicated(await drain(rabbit_broker.url, QUEUE.queue, DECODERS[cdc_format]))
    assert [e.rev for e in events] == list(range(1, final + 1))
    assert expiring and {Op.SET, Op.DELETE} <= {op for op, _, _ in acked.values()}
    for e in events:
        if e.rev not in acked:
            assert (e.op, e.value) == (EXPIRY[cdc_format], None) and ttl_key(e.key), e
        else:
            assert (e.op, e.key, e.value) == acked[e.rev]
    assert sorted(e.key for e in events if e.rev not in acked) == expiring


async def test_writes_blocked_by_a_full_queue_succeed_once_the_broker_returns(rabbit_broker: RabbitBroker) -> None:
    await asyncio.to_thread(rabbit_broker.stop)
    small = {"max_batch_items": 5, "cdc_queue_events": 10, "cdc_block_timeout_ms": 60_000}
    async with running_node(rabbitmq_url=rabbit_broker.url, **small) as (_, kv):
        for i in range(10):
            await kv.Set(pb.SetRequest(key=f"k{i}", value=b"v"))
        blocked = asyncio.ensure_future(kv.Set(pb.SetRequest(key="waits", value=b"v"), timeout=60))
        while (await kv.Info(pb.InfoRequest())).cdc.writes_delayed == 0:
            await asyncio.sleep(0.01)
        assert not blocked.done()
        await asyncio.to_thread(rabbit_broker.start)
        written = await blocked
        assert written.revision == 11
        info = await kv.Info(pb.InfoRequest())
        assert info.cdc.writes_refused == 0
    events = deduplicated(await drain(rabbit_broker.url, QUEUE.queue))
    assert [e.rev for e in events] == list(range(1, 12))
    assert events[-1].key == "waits"
