"""Serving keys this node does not own, when it is part of a cluster: the node
forwards the call to the key's owner (by the consistent-hash ring of the nodes
registered in etcd) and relays the answer. A client that routes by the ring,
as fluxkv.Client does, never needs this; a plain gRPC client (or Flux-KV's,
which hashes keys its own way) still gets a correct answer, for one more hop.

One mechanism, keyed by the method: the node wraps the handler of each call
about one key (ONE_KEY_CALLS; its request's `key` names the key) with
Router.forwarding, which forwards the call as it came when another node owns
the key, so that handlers know nothing of it; the multi-key calls, which
check the whole batch first, split their keys with Router.split and forward
each owner's part with Router.forward, by their method's descriptor.

A forwarded call carries the metadata call_context.FORWARDED_BY, and the node
receiving it serves it itself: a call is forwarded at most once, even while
two nodes briefly disagree about the ring. It also carries the caller's
`authorization`, which the owner checks again (docs/security.md).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message

from fluxkv.cluster.hash_ring import HashRing
from fluxkv.core.errors import ErrorKind, KVError
from fluxkv.obs.tracing import Tracing
from fluxkv.rpc import call_context
from fluxkv.rpc import status as rpc_status
from fluxkv.rpc.spans import client_failed, client_span
from fluxkv.security.tls import TLS, aio_channel

DEFAULT_TIMEOUT_S = 10.0
# The calls about one key, by service: each is served by the key's owner.
ONE_KEY_CALLS = {"fluxkv.v1.KV": ("Get", "Set", "Delete"), "service.KVService": ("Set", "Get", "Del")}

Handler = Callable[[Any], Any]


class Router:
    def __init__(
        self,
        address: str,
        vnodes: int,
        max_message_bytes: int,
        tracing: Tracing | None = None,
        tls: TLS | None = None,
    ) -> None:
        """`tls`: how to reach the other nodes when they serve TLS (None: plaintext)."""
        self.address = address
        self._credentials = None if tls is None else tls.channel_credentials()
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

    def forwarding(self, services: Mapping[str, Mapping[str, Handler]]) -> dict[str, dict[str, Handler]]:
        """`services` ({"pkg.Service": {"Method": handler}}) with the handler of
        each call about one key (ONE_KEY_CALLS) wrapped: a call whose key
        another node owns goes to that node as it came, which checks it."""
        wrapped = {service: dict(handlers) for service, handlers in services.items()}
        for service, names in ONE_KEY_CALLS.items():
            for name in names:
                wrapped[service][name] = self._on_owner(f"{service}.{name}", wrapped[service][name])
        return wrapped

    def _on_owner(self, full_name: str, handler: Handler) -> Handler:
        method = descriptor_pool.Default().FindMethodByName(full_name)
        key = method.input_type.fields_by_name.get("key")
        if method.server_streaming or key is None or key.type != key.TYPE_STRING:
            raise ValueError(f"{full_name} is not a unary call about the key its request's string `key` names")

        async def serve(request: Any) -> Any:
            owner = self.remote_owner(request.key)
            if owner is None:
                return await handler(request)
            return await self.forward(owner, method, request)

        return serve

    async def forward(self, owner: str, method: MethodDescriptor, request: Message) -> Any:
        """Make a call of `method` (a unary one) on `owner`, within what is left of the
        caller's deadline; its answer, of the method's response type."""
        channel = self._channels.get(owner)
        if channel is None:
            channel = self._channels[owner] = aio_channel(owner, self._credentials, self._options)
        name = f"{method.containing_service.full_name}/{method.name}"
        response = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(f"/{name}", request_serializer=_serialize, response_deserializer=response.FromString)
        self.forwarded += 1
        metadata: list[tuple[str, str | bytes]] = [(call_context.FORWARDED_BY, self.address)]
        # The owner checks the caller's token again: its tokens file has the last word on its keys.
        authorization = call_context.metadata_value(call_context.AUTHORIZATION)
        if authorization is not None:
            metadata.append((call_context.AUTHORIZATION, authorization))
        timeout = call_context.time_remaining() or DEFAULT_TIMEOUT_S
        try:
            if self._tracing is None:
                answer = await call(request, timeout=timeout, metadata=metadata)
            else:
                with client_span(self._tracing.tracer, name, owner) as (span, trace_metadata):
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
