"""The private RabbitMQ node of deploy/private_servers.py: restart keeps durable data, kill ends the node, and a
port taken while it was down makes start() fail clearly; a broker with a user of its own, and nothing left after
close()."""

from __future__ import annotations

import asyncio
import os
import socket

import aio_pika
import pytest
from aio_pika import DeliveryMode, Message

from deploy.private_servers import (
    CLI_DIST_PORTS,
    RESERVED_PORTS_FROM,
    RabbitBroker,
    RabbitBrokerError,
    ephemeral_ports_from,
    free_port,
)

SYSTEM_BROKER = "amqp://guest:guest@127.0.0.1:5672/"
QUEUE = "fluxkv-durable"
LOST_TIMEOUT_S = 10


async def test_restart_keeps_durable_queue_and_persistent_messages(rabbit_broker: RabbitBroker) -> None:
    persistent = [f"persistent {i}".encode() for i in range(20)]
    async with await aio_pika.connect(rabbit_broker.url) as connection:
        channel = await connection.channel()  # with publisher confirms: each publish returns once the broker has it
        queue = await channel.declare_queue(QUEUE, durable=True)
        for body in persistent:
            await channel.default_exchange.publish(
                Message(body, delivery_mode=DeliveryMode.PERSISTENT), routing_key=queue.name
            )
        # A durable queue drops transient messages when its node restarts: this one shows a real restart.
        await channel.default_exchange.publish(Message(b"transient"), routing_key=queue.name)
    port, pid = rabbit_broker.port, rabbit_broker.pid

    await asyncio.to_thread(rabbit_broker.restart)

    assert rabbit_broker.port == port
    assert rabbit_broker.pid not in (None, pid)
    async with await aio_pika.connect(rabbit_broker.url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(QUEUE, passive=True)
        received = [(await queue.get(no_ack=True)).body for _ in persistent]
        assert received == persistent
        assert await queue.get(no_ack=True, fail=False) is None


async def test_kill_ends_the_node_and_start_brings_it_back(rabbit_broker: RabbitBroker) -> None:
    pid = rabbit_broker.pid
    assert pid is not None
    connection = await aio_pika.connect(rabbit_broker.url)
    lost = asyncio.Event()
    connection.close_callbacks.add(lambda *_: lost.set())

    rabbit_broker.kill()

    assert rabbit_broker.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    await asyncio.wait_for(lost.wait(), LOST_TIMEOUT_S)
    await connection.close()
    with pytest.raises(ConnectionError):
        await aio_pika.connect(rabbit_broker.url)
    async with await aio_pika.connect(SYSTEM_BROKER):  # which other tests share: untouched
        pass

    await asyncio.to_thread(rabbit_broker.start)

    assert rabbit_broker.pid not in (None, pid)
    async with await aio_pika.connect(rabbit_broker.url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(Message(b"after kill"), routing_key=queue.name)
        assert (await queue.get(no_ack=True)).body == b"after kill"


def test_start_fails_clearly_when_its_port_was_taken(rabbit_broker: RabbitBroker) -> None:
    rabbit_broker.stop()
    with socket.create_server(("127.0.0.1", rabbit_broker.port)):
        with pytest.raises(RabbitBrokerError, match=f"AMQP port {rabbit_broker.port} is taken"):
            rabbit_broker.start()
    assert rabbit_broker.pid is None


@pytest.mark.broker
async def test_a_broker_with_its_own_user_leaves_nothing_behind() -> None:
    with RabbitBroker(user="stack-user", password="p@ss word") as broker:
        pids = [broker.pid, broker.epmd_pid]
        base_dir = broker.base_dir
        assert broker.url.startswith("amqp://stack-user:p%40ss%20word@")
        async with await aio_pika.connect(broker.url):
            pass
    assert not base_dir.exists()
    for pid in pids:
        assert pid is not None
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_free_ports_are_drawn_below_the_range_outgoing_connections_take_theirs_from() -> None:
    below = ephemeral_ports_from()
    ports = [free_port() for _ in range(50)]
    assert all(RESERVED_PORTS_FROM <= port < below for port in ports)
    assert not set(ports) & set(CLI_DIST_PORTS)
    for port in ports[:5]:  # each was free: a server can bind it
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
