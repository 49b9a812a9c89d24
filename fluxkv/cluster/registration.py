"""A node's registration in etcd: the key <prefix><address>, whose value is the
address (as Flux-KV wrote it), attached to a lease that a background task keeps
alive. If the lease is lost (etcd restarted with its data gone, or unreachable
for longer than the TTL), the task registers again by itself once etcd answers,
and says so in one log line. Shutdown revokes the lease first, so clients stop
routing to the node before it stops serving.
"""

from __future__ import annotations

import asyncio
import logging

from fluxkv.cluster.etcd_client import EtcdClient, EtcdError
from fluxkv.core.backoff import Backoff
from fluxkv.obs.metrics import Family, counter, states

log = logging.getLogger("fluxkv.registration")

RETRY_MIN_S = 0.2
RETRY_MAX_S = 5.0
STATES = ("unregistered", "registered", "lost", "revoked")


class Registration:
    def __init__(self, client: EtcdClient, prefix: str, address: str, ttl_s: int) -> None:
        self._client = client
        self.key = prefix + address
        self.address = address
        self._ttl = ttl_s
        self._lease = 0
        self.state = "unregistered"  # one of STATES
        self.registrations = 0

    def describe(self) -> str:
        lease = f"lease {self._lease:x}, TTL {self._ttl} s" if self._lease else f"TTL {self._ttl} s"
        return f"{self.state} as {self.key} ({lease}); registered {self.registrations} times"

    def collect(self) -> list[Family]:
        """The registration's metrics, for the node's registry."""
        return [
            states(
                "fluxkv_etcd_registration", "This node's registration in etcd: 1 for its state now.", self.state, STATES
            ),
            counter(
                "fluxkv_etcd_registrations_total",
                "Times this node registered in etcd (again after a lost lease).",
                self.registrations,
            ),
        ]

    async def register(self) -> None:
        """Grant a lease and put the key under it; raises EtcdError."""
        lease = await self._client.lease_grant(self._ttl)
        await self._client.put(self.key, self.address, lease=lease)
        self._lease = lease
        self.registrations += 1
        again = self.state == "lost"
        self.state = "registered"
        if again:
            log.info("registered again in etcd as %s (lease %x)", self.key, lease, extra={"event": "registered"})
        else:
            log.info(
                "registered in etcd as %s (lease %x, TTL %d s)",
                self.key,
                lease,
                self._ttl,
                extra={"event": "registered"},
            )

    async def run(self) -> None:
        """Keep the lease alive, registering again whenever it is lost."""
        backoff = Backoff(RETRY_MIN_S, RETRY_MAX_S)
        while True:
            if self.state != "registered":
                try:
                    await self.register()
                    backoff.reset()
                except EtcdError as exc:
                    await asyncio.sleep(backoff.next_delay())
                    log.debug("cannot register yet: %s", exc)
                    continue
            await asyncio.sleep(self._ttl / 3)
            try:
                remaining = await self._client.lease_keepalive(self._lease)
            except EtcdError as exc:
                reason = str(exc)
            else:
                if remaining > 0:
                    continue
                reason = "etcd no longer knows the lease"
            # Register anew (a new lease): the old one, if it still lives, expires unused.
            if self.state == "registered":
                log.warning(
                    "cannot renew the etcd registration of %s (%s); registering again",
                    self.key,
                    reason,
                    extra={"event": "registration_lost"},
                )
            self.state = "lost"

    async def revoke(self) -> None:
        """Remove the registration now (the caller bounds the wait)."""
        if self.state != "registered":
            self.state = "revoked"
            return
        self.state = "revoked"
        try:
            await self._client.lease_revoke(self._lease)
            log.info("deregistered from etcd: %s", self.key, extra={"event": "deregistered"})
        except EtcdError as exc:
            log.warning(
                "could not revoke the etcd lease of %s (%s); it expires within %d s",
                self.key,
                exc,
                self._ttl,
                extra={"event": "deregister_failed"},
            )
