"""Discovery: the addresses of the nodes registered under an etcd prefix, kept
current. It reads the prefix, then watches it from the revision after that
read (so no change falls between the two); a broken watch or a compacted
revision makes it read again. A key's deletion removes that key's node (the
key names the node: Flux-KV looked nodes up by the deleted key's value, which
etcd sends empty, so its dead nodes stayed in the ring).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Self

from fluxkv.cluster.etcd_client import EtcdClient, EtcdCompacted, EtcdError
from fluxkv.config import Settings
from fluxkv.core.backoff import Backoff
from fluxkv.security.tls import TLS

log = logging.getLogger("fluxkv.discovery")

RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0

Listener = Callable[[frozenset[str]], None]
DEFAULT_PREFIX = Settings.etcd_prefix


class Discovery:
    def __init__(self, client: EtcdClient, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._members: dict[str, str] = {}  # key -> address
        self._revision = 0
        self._listeners: list[Listener] = []
        self.addresses: frozenset[str] = frozenset()

    def on_change(self, listener: Listener) -> None:
        """Call `listener(addresses)` after every change of the set."""
        self._listeners.append(listener)

    async def read(self) -> None:
        """Read the registered nodes now; raises EtcdError."""
        pairs, revision = await self._client.get_prefix(self._prefix)
        self._members = {key: value for key, value in pairs if value}
        self._revision = revision
        self._publish()

    async def run(self) -> None:
        """Watch for changes until cancelled, reading again whenever needed."""
        backoff = Backoff(RETRY_MIN_S, RETRY_MAX_S)
        while True:
            try:
                async for events in self._client.watch_prefix(self._prefix, self._revision + 1):
                    for e in events:
                        if e.kind == "put" and e.value:
                            self._members[e.key] = e.value
                        else:
                            self._members.pop(e.key, None)
                        self._revision = e.mod_revision
                    self._publish()
                    backoff.reset()
                raise EtcdError("the watch ended")
            except EtcdCompacted as exc:
                log.info("discovery: revision %d was compacted (%s); reading the nodes again", self._revision, exc)
            except EtcdError as exc:
                delay = backoff.next_delay()
                log.warning("discovery: watching %s failed (%s); reading again in %.1f s", self._prefix, exc, delay)
                await asyncio.sleep(delay)
            try:
                await self.read()
            except EtcdError as exc:
                log.debug("discovery: reading %s failed: %s", self._prefix, exc)

    def _publish(self) -> None:
        addresses = frozenset(self._members.values())
        if addresses == self.addresses:
            return
        joined, left = addresses - self.addresses, self.addresses - addresses
        self.addresses = addresses
        log.info(
            "discovery: %d nodes%s%s",
            len(addresses),
            f"; joined: {', '.join(sorted(joined))}" if joined else "",
            f"; left: {', '.join(sorted(left))}" if left else "",
        )
        for listener in self._listeners:
            listener(addresses)


class EtcdNodes:
    """A node source for fluxkv.Client that follows the nodes registered in etcd:

        async with EtcdNodes(["127.0.0.1:2379"]) as nodes, Client(nodes) as client:
            ...

    Entering reads the nodes (EtcdError if etcd cannot be reached, EtcdAuthFailed
    if it refuses the user and password) and starts following changes; leaving
    stops. SyncClient.from_etcd does the same for blocking code.

    `tls` speaks TLS to etcd (`TLS(ca_file)`, and a client certificate for an
    etcd that asks for one; an https:// endpoint without it uses the system's
    CA certificates). `username` and `password`: etcd's auth, whose token is
    renewed whenever etcd refuses it as expired.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = DEFAULT_PREFIX,
        timeout_s: float = 5.0,
        *,
        tls: TLS | None = None,
        username: str = "",
        password: str = "",
    ) -> None:
        self._client = EtcdClient(endpoints, timeout_s, tls=tls, username=username, password=password)
        self._discovery = Discovery(self._client, prefix)
        self._task: asyncio.Task[None] | None = None

    @property
    def addresses(self) -> frozenset[str]:
        return self._discovery.addresses

    def on_change(self, listener: Listener) -> None:
        self._discovery.on_change(listener)

    async def __aenter__(self) -> Self:
        try:
            await self._discovery.read()
        except EtcdError:
            await self._client.close()
            raise
        self._task = asyncio.create_task(self._discovery.run(), name="fluxkv-etcd-nodes")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._client.close()
