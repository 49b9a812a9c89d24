"""Serving keys this node does not own, when it is part of a cluster: the node
forwards the call to the key's owner (by the consistent-hash ring of the nodes
registered in etcd) and relays the answer. A client that routes by the ring,
as fluxkv.Client does, never needs this; a plain gRPC client (or Flux-KV's,
which hashes keys its own way) still gets a correct answer, for one more hop.

A forwarded call carries the metadata call_context.FORWARDED_BY, and the node
receiving it serves it itself: a call is forwarded at most once, even while
two nodes briefly disagree about the ring.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from fluxkv import call_context, rpc_status
from fluxkv.errors import ErrorKind, KVError
from fluxkv.hash_ring import HashRing
from fluxkv.rpc_spans import client_failed, client_span
from fluxkv.tracing import Tracing

M = TypeVar("M", bound=Message)

DEFAULT_TIMEOUT_S = 10.0


class Router:
    def __init__(self, address: str, vnodes: int, max_message_bytes: int, tracing: Tracing | None = None) -> None:
        self.address = address
        self._tracing = tracing
        self._vnodes = vnodes
        self._ring: HashRing | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self.forwarded = 0

    def update(self, addresses: frozenset[str]) -> None:
        """The registered nodes changed. With none (etcd not read yet, or this
        node alone and unregistered), the node serves every key itself."""
        self._ring = HashRing(addresses, self._vnodes) if addresses else None
        for gone in set(self._channels) - addresses:
            channel = self._channels.pop(gone)
            asyncio.get_running_loop().create_task(channel.close())

    def remote_owner(self, key: str) -> str | None:
        """The owner of `key` when this call must be forwarded to it, else None."""
        if self._ring is None:
            return None
        owner = self._ring.owner(key)
        if owner == self.address or call_context.forwarded():
            return None
        return owner

    async def forward(self, owner: str, method: str, request: Message, response: type[M]) -> M:
        """Make the same call on `owner`, within what is left of the caller's deadline."""
        channel = self._channels.get(owner)
        if channel is None:
            channel = self._channels[owner] = grpc.aio.insecure_channel(owner, options=self._options)
        call = channel.unary_unary(method, request_serializer=_serialize, response_deserializer=response.FromString)
        self.forwarded += 1
        metadata = [(call_context.FORWARDED_BY, self.address)]
        timeout = call_context.time_remaining() or DEFAULT_TIMEOUT_S
        try:
            if self._tracing is None:
                answer: M = await call(request, timeout=timeout, metadata=metadata)
            else:
                with client_span(self._tracing.tracer, method.lstrip("/"), owner) as (span, trace_metadata):
                    try:
                        answer = await call(request, timeout=timeout, metadata=metadata + (trace_metadata or []))
                    except grpc.aio.AioRpcError as exc:
                        client_failed(span, exc.code())
                        raise
        except grpc.aio.AioRpcError as exc:
            # The owner's failure reaches the caller as it is, with its details; a
            # status that is no error kind (CANCELLED as the owner stops, say) as UNAVAILABLE.
            kind = rpc_status.kind_of_status(exc.code()) or ErrorKind.UNAVAILABLE
            info = rpc_status.error_info(exc.trailing_metadata())
            raise KVError(kind, f"{exc.details()} (from {owner}, the key's owner)", info) from None
        return answer

    async def split(
        self,
        keys: Sequence[str],
        local: Callable[[list[int]], Awaitable[list[Any]]],
        remote: Callable[[str, list[int]], Awaitable[list[Any]]],
    ) -> list[Any]:
        """Serve a multi-key call: group the items by owner, serve this node's
        with `local(indexes)` and each other owner's with `remote(owner,
        indexes)`, all at once; return the results in request order."""
        groups: dict[str | None, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(self.remote_owner(key), []).append(i)
        if list(groups) == [None]:
            return await local(groups[None])
        parts = await asyncio.gather(
            *(local(indexes) if owner is None else remote(owner, indexes) for owner, indexes in groups.items())
        )
        results: list[Any] = [None] * len(keys)
        for indexes, part in zip(groups.values(), parts, strict=True):
            for i, result in zip(indexes, part, strict=True):
                results[i] = result
        return results

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels.values()))
        self._channels.clear()


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()
