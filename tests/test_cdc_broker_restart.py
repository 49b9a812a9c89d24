"""CDC through a broker that dies: a private RabbitMQ node is killed (SIGKILL)
in the middle of a write load and started again; every acknowledged write
must then be in the queue. Also: writes blocked by a full queue go through
once the broker comes back."""

from __future__ import annotations

import asyncio
import logging

import pytest

from fluxkv.changes import Op
from fluxkv.private_servers import RabbitBroker
from fluxkv.proto import kv_pb2 as pb

from .conftest import Names, running_node
from .test_cdc import deduplicated, drain

pytestmark = pytest.mark.usefixtures("grpc_server")

QUEUE = Names("flux_kv_events", "flux_cdc_file_logger")


async def test_no_acknowledged_write_is_lost_when_the_broker_is_killed_and_restarted(
    rabbit_broker: RabbitBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fluxkv")
    acked: dict[int, tuple[str, bytes]] = {}
    milestones = {300: asyncio.Event(), 900: asyncio.Event()}
    stop = asyncio.Event()
    settings = {"rabbitmq_url": rabbit_broker.url, "cdc_linger_ms": 2, "cdc_flush_timeout_s": 60.0}
    async with running_node(**settings) as (node, kv):

        async def writer(w: int) -> None:
            i = 0
            while not stop.is_set():
                key, value = f"w{w}-{i}", f"{w}:{i}".encode()
                r = await kv.Set(pb.SetRequest(key=key, value=value), timeout=30)
                acked[r.revision] = (key, value)
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
        final = node.store.revision
    # The node stopped: it published and the broker confirmed everything.
    assert "CDC lost the broker" in caplog.text
    assert "the broker confirmed every CDC event" in caplog.text
    events = deduplicated(await drain(rabbit_broker.url, QUEUE.queue))
    assert [e.rev for e in events] == list(range(1, final + 1))
    by_rev = {e.rev: e for e in events}
    for rev, (key, value) in acked.items():
        assert (by_rev[rev].op, by_rev[rev].key, by_rev[rev].value) == (Op.SET, key, value)


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
