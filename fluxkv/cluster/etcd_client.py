"""A small asyncio client for etcd's v3 gRPC API, with just what FluxKV's registration and discovery need: leases,
puts, prefix reads and prefix watches. It is built on code generated from proto/etcd_api.proto (a wire-compatible
subset of etcd's API) because the etcd3 package is unmaintained and breaks with current protobuf.

Calls go to one endpoint at a time and move on to the next one when it is unavailable, and each call has one deadline
(the client's timeout) for all its attempts. Endpoints are plain text (http://) or TLS (https://, or any endpoint when
a TLS is given). With a username, the client calls Auth/Authenticate before its first call and sends etcd's token as
the metadata `token` on every call; when etcd refuses the token (expired, or older than a change of etcd's users and
roles), it authenticates again and retries the call once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import grpc

from fluxkv.proto import etcd_api_pb2 as pb
from fluxkv.proto import etcd_api_pb2_grpc as pb_grpc
from fluxkv.proto import etcd_mvcc_pb2 as mvcc
from fluxkv.security.tls import TLS

_T = TypeVar("_T")
_Metadata = tuple[tuple[str, str], ...]
_CLOSED = "the etcd client is closed"

_CHANNEL_OPTIONS = [
    # gRPC's reconnect backoff grows to 120 s by default; a restarted etcd should be found within about a second.
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Notice a dead connection under a quiet watch within 15 s; pings only while a call is open, and less often than
    # etcd's --grpc-keepalive-min-time (5 s by default) so that etcd does not refuse them.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]

# How etcd 3.x refuses a token (api/v3rpc/rpctypes): expired or unknown (UNAUTHENTICATED), issued before a change of
# its users or roles (INVALID_ARGUMENT), or missing, as when auth was enabled after the client found it off
# (INVALID_ARGUMENT). A watch gets the same words in its cancel_reason.
_TOKEN_REFUSALS = (
    "etcdserver: invalid auth token",
    "etcdserver: revision of auth store is old",
    "etcdserver: user name is empty",
)
_AUTH_FAILED = "etcdserver: authentication failed"  # a wrong user name or password
_AUTH_NOT_ENABLED = "etcdserver: authentication is not enabled"


class EtcdError(Exception):
    """A call to etcd failed."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time, or an open watch broke: try again (for a watch: read again, watch anew)."""


class EtcdAuthFailed(EtcdError):
    """etcd refused the user name and password."""

    def __init__(self, message: str, username: str) -> None:
        super().__init__(message)
        self.username = username


class EtcdCompacted(EtcdError):
    """A watch asked for revisions that etcd has compacted away: read again and watch from the revision after."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(
            f"etcd has compacted its history up to revision {compact_revision}: "
            "read the keys again and watch from the revision after that read"
        )
        self.compact_revision = compact_revision


@dataclass(frozen=True)
class WatchEvent:
    """One change under a watched prefix."""

    kind: Literal["put", "delete"]
    key: str
    value: str  # "" for a delete
    mod_revision: int  # the revision of this change


@dataclass
class _Endpoint:
    address: str
    channel: grpc.aio.Channel
    kv: pb_grpc.KVStub
    watch: pb_grpc.WatchStub
    lease: pb_grpc.LeaseStub
    auth: pb_grpc.AuthStub


# One try of a call: (endpoint, seconds left, metadata) -> its result.
_Attempt = Callable[[_Endpoint, float, _Metadata], Awaitable[_T]]


class _TokenRefused(Exception):
    """etcd refused the token an attempt sent (a watch learns it from its cancel_reason, not from a status)."""


class EtcdClient:
    """Talks to an etcd cluster through one of its endpoints ("host:port", "http://host:port" or
    "https://host:port").

    `tls`: how to speak TLS to etcd (every endpoint must then be https:// or host:port); an https:// endpoint
    without it verifies etcd with the system's CA certificates. `username` and `password`: etcd's auth (see the
    module's docstring); etcd without auth enabled is called without a token.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        timeout_s: float,
        *,
        tls: TLS | None = None,
        username: str = "",
        password: str = "",
    ) -> None:
        schemes = {_scheme(e) for e in endpoints}
        if "http" in schemes and (tls is not None or "https" in schemes):
            raise ValueError(
                f"etcd endpoints {', '.join(endpoints)}: http:// is plain text, but TLS is asked for "
                "(an https:// endpoint, or a CA or client certificate): use https:// or host:port"
            )
        self._addresses = [_address(e) for e in endpoints]
        if not self._addresses:
            raise ValueError("no etcd endpoint given")
        if timeout_s <= 0:
            raise ValueError(f"the etcd timeout must be positive, not {timeout_s}")
        if bool(username) != bool(password):
            raise ValueError("an etcd username and password go together: give both or neither")
        self._timeout_s = timeout_s
        if tls is None and "https" in schemes:
            tls = TLS()
        self._credentials = None if tls is None else tls.channel_credentials()
        self._username = username
        self._password = password
        self._token: str | None = None  # None: not authenticated yet; "": etcd's auth is off
        self._auth_lock = asyncio.Lock()  # one Authenticate at a time: etcd checks each password with bcrypt
        self.authentications = 0  # tokens etcd gave this client
        self.auth_error = ""  # why etcd refused the user name and password last, until it accepts them
        self._endpoints: dict[int, _Endpoint] = {}  # connected on first use, by index in _addresses
        self._current = 0  # the endpoint calls go to first
        self._closed = False

    @property
    def tls(self) -> bool:
        """Whether the client speaks TLS to etcd."""
        return self._credentials is not None

    @property
    def username(self) -> str:
        """The etcd user the client authenticates as; empty without etcd's auth."""
        return self._username

    def describe(self) -> str:
        """How the client reaches etcd: TLS or not, and as which user."""
        transport = "TLS" if self.tls else "plain text"
        if not self._username:
            return f"{transport}, no etcd user"
        if self.auth_error:
            return f"{transport}, etcd refused user {self._username!r}: {self.auth_error}"
        if self._token == "":
            return f"{transport}, user {self._username!r} (etcd's auth is off: no token needed)"
        return f"{transport}, user {self._username!r}, {self.authentications} tokens from etcd"

    async def close(self) -> None:
        """Close the connections; calls and watches still open raise EtcdError."""
        self._closed = True
        endpoints, self._endpoints = self._endpoints, {}
        for endpoint in endpoints.values():
            await endpoint.channel.close()

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def lease_grant(self, ttl_s: int) -> int:
        """Create a lease of ttl_s seconds (etcd raises a TTL below its minimum to it); returns its ID."""
        request = pb.LeaseGrantRequest(TTL=ttl_s)
        response = await self._call(
            "lease grant", lambda e, timeout, md: e.lease.LeaseGrant(request, timeout=timeout, metadata=md)
        )
        if response.error:
            raise EtcdError(f"etcd refused a lease of {ttl_s} s: {response.error}")
        return int(response.ID)

    async def lease_revoke(self, lease_id: int) -> None:
        """End the lease and delete its keys; a lease that no longer exists is not an error."""
        request = pb.LeaseRevokeRequest(ID=lease_id)

        async def revoke(endpoint: _Endpoint, timeout: float, metadata: _Metadata) -> None:
            try:
                await endpoint.lease.LeaseRevoke(request, timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise

        await self._call("lease revoke", revoke)

    async def lease_keepalive(self, lease_id: int) -> int:
        """Renew the lease once; returns its TTL in seconds from now, 0 when it has expired or etcd does not know it.

        Each call opens a LeaseKeepAlive stream of its own, sends one request and reads the answer: so a renewal gets
        the deadline and the failover of any other call, with no shared stream to lock, watch over and reopen. A
        renewal every few seconds makes the cost, one HTTP/2 stream per renewal, negligible.
        """
        request = pb.LeaseKeepAliveRequest(ID=lease_id)

        async def renew(endpoint: _Endpoint, timeout: float, metadata: _Metadata) -> int:
            # The request iterator ends after one request: etcd answers it, then ends the stream.
            async for response in endpoint.lease.LeaseKeepAlive(iter([request]), timeout=timeout, metadata=metadata):
                return int(response.TTL)
            raise EtcdUnavailable(f"etcd at {endpoint.address} ended a lease keep-alive without an answer")

        return await self._call("lease keep-alive", renew)

    async def put(self, key: str, value: str, lease: int = 0) -> int:
        """Write key = value, attached to the lease unless it is 0; returns the revision of the write."""
        request = pb.PutRequest(key=key.encode(), value=value.encode(), lease=lease)
        response = await self._call("put", lambda e, timeout, md: e.kv.Put(request, timeout=timeout, metadata=md))
        return int(response.header.revision)

    async def get_prefix(self, prefix: str) -> tuple[list[tuple[str, str]], int]:
        """The (key, value) pairs under prefix, in key order, and the revision they were read at: watching from the
        revision after it misses no change."""
        key, range_end = _prefix_range(prefix)
        request = pb.RangeRequest(key=key, range_end=range_end)
        response = await self._call("get", lambda e, timeout, md: e.kv.Range(request, timeout=timeout, metadata=md))
        return [(_text(kv.key), _text(kv.value)) for kv in response.kvs], int(response.header.revision)

    async def delete(self, key: str) -> None:
        """Delete the key; an absent key is not an error."""
        request = pb.DeleteRangeRequest(key=key.encode())
        await self._call("delete", lambda e, timeout, md: e.kv.DeleteRange(request, timeout=timeout, metadata=md))

    async def watch_prefix(self, prefix: str, start_revision: int) -> AsyncGenerator[list[WatchEvent], None]:
        """The changes under prefix from start_revision on (0: from now on), in revision order, as etcd batches them.

        Raises EtcdCompacted when start_revision is older than etcd's history and EtcdUnavailable when the stream
        breaks; either way, read again and watch from the revision after that read. Only setting the watch up has a
        deadline; then it waits for changes for as long as the caller iterates. Leaving the loop early: close the
        generator (contextlib.aclosing) to end the stream at once rather than when it is garbage-collected.
        """
        key, range_end = _prefix_range(prefix)
        create = pb.WatchCreateRequest(key=key, range_end=range_end, start_revision=start_revision)

        async def open_watch(endpoint: _Endpoint, timeout: float, metadata: _Metadata) -> tuple[str, Any, Any]:
            call = endpoint.watch.Watch(metadata=metadata)
            try:
                async with asyncio.timeout(timeout):
                    await call.write(pb.WatchRequest(create_request=create))
                    response = await call.read()  # etcd's answer to the create request
            except BaseException:
                call.cancel()
                raise
            if response is not grpc.aio.EOF and response.canceled and _refuses_token(response.cancel_reason):
                call.cancel()
                raise _TokenRefused(response.cancel_reason)
            return endpoint.address, call, response

        address, call, response = await self._call("watch", open_watch)
        try:
            while True:
                if response is grpc.aio.EOF:
                    raise EtcdUnavailable(f"etcd at {address} ended the watch of {prefix!r}")
                if response.canceled:
                    if response.compact_revision:
                        raise EtcdCompacted(response.compact_revision)
                    reason = response.cancel_reason or "no reason given"
                    raise EtcdError(f"etcd at {address} canceled the watch of {prefix!r}: {reason}")
                if response.events:
                    yield [_watch_event(e) for e in response.events]
                try:
                    response = await call.read()
                except grpc.aio.AioRpcError as exc:
                    raise EtcdUnavailable(
                        f"the watch of {prefix!r} on etcd at {address} broke: {exc.code().name}: {exc.details()}"
                    ) from None
                except asyncio.CancelledError:
                    self._raise_if_closed()
                    raise
        finally:
            call.cancel()

    async def _call(self, what: str, attempt: _Attempt[_T]) -> _T:
        """Run attempt(endpoint, seconds left, metadata) on the current endpoint, then on the next ones while they
        are unavailable, until the client's timeout has passed. A retried call may have been applied already, which
        is harmless for these calls (at worst an extra revision, or a lease that expires unused)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        failures: list[str] = []
        for _ in self._addresses:
            index = self._current
            endpoint = self._endpoint(index)
            try:
                return await self._authorized(endpoint, deadline, attempt)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    details = f"{exc.code().name}: {exc.details()}"
                    raise EtcdError(
                        f"etcd at {endpoint.address} refused the {what}: {details}{self._hint(details)}"
                    ) from None
                failures.append(f"{endpoint.address}: {exc.code().name}: {exc.details()}")
            except _TokenRefused as exc:
                raise EtcdError(f"etcd at {endpoint.address} refused the {what}: {exc}{self._hint(str(exc))}") from None
            except TimeoutError:
                failures.append(f"{endpoint.address}: no answer")
            except asyncio.CancelledError:
                self._raise_if_closed()
                raise
            if self._current == index:  # unless a concurrent call has moved on already
                self._current = (index + 1) % len(self._addresses)
            if loop.time() >= deadline:
                break
        hint = ""
        if any("TSI_" in failure for failure in failures):  # gRPC's words for a failed TLS handshake
            hint = (
                ": the TLS handshake failed; check the CA certificates etcd is verified with and, if etcd asks for "
                "one, the client certificate"
            )
        raise EtcdUnavailable(
            f"etcd is unavailable at {', '.join(self._addresses)}: {what} failed ({'; '.join(failures)}){hint}"
        )

    async def _authorized(self, endpoint: _Endpoint, deadline: float, attempt: _Attempt[_T]) -> _T:
        """The attempt with the client's token, authenticating first if need be; once more with a new token when
        etcd refuses the one it sent."""
        loop = asyncio.get_running_loop()
        if not self._username:
            return await attempt(endpoint, deadline - loop.time(), ())
        token = self._token
        if token is None:
            token = await self._authenticate(endpoint, deadline, None)
        try:
            return await attempt(endpoint, deadline - loop.time(), _metadata(token))
        except grpc.aio.AioRpcError as exc:
            if not _refuses_token(exc.details() or ""):
                raise
        except _TokenRefused:
            pass
        token = await self._authenticate(endpoint, deadline, token)
        return await attempt(endpoint, deadline - loop.time(), _metadata(token))

    async def _authenticate(self, endpoint: _Endpoint, deadline: float, refused: str | None) -> str:
        """A token in place of `refused` (None: the first one); one that a concurrent call got meanwhile will do."""
        async with self._auth_lock:
            if self._token is not None and self._token != refused:
                return self._token
            request = pb.AuthenticateRequest(name=self._username, password=self._password)
            timeout = deadline - asyncio.get_running_loop().time()
            try:
                # Without the old token: etcd 3.4 refuses an Authenticate that carries an expired one.
                token = str((await endpoint.auth.Authenticate(request, timeout=timeout)).token)
            except grpc.aio.AioRpcError as exc:
                details = exc.details() or ""
                if _AUTH_NOT_ENABLED in details:
                    token = ""
                elif _AUTH_FAILED in details:
                    self.auth_error = details
                    raise EtcdAuthFailed(
                        f"etcd at {endpoint.address} refused user {self._username!r} and its password: {details}",
                        self._username,
                    ) from None
                else:
                    raise
            else:
                self.authentications += 1
            self._token = token
            self.auth_error = ""
            return token

    def _hint(self, refusal: str) -> str:
        """What to do about a refused token when the client has no user to authenticate as."""
        if not self._username and _refuses_token(refusal):
            return " (etcd's auth is enabled: give a username and password)"
        return ""

    def _raise_if_closed(self) -> None:
        """On a CancelledError from grpc: raise EtcdError if it comes from close(), which cancels the calls on the
        channels it closes, rather than from a cancellation of the caller's task (let that one through)."""
        task = asyncio.current_task()
        if self._closed and task is not None and not task.cancelling():
            raise EtcdError(_CLOSED)

    def _endpoint(self, index: int) -> _Endpoint:
        if self._closed:
            raise EtcdError(_CLOSED)
        endpoint = self._endpoints.get(index)
        if endpoint is None:
            address = self._addresses[index]
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.secure_channel(address, self._credentials, options=_CHANNEL_OPTIONS)
            # The generated stubs have no annotations.
            stubs = pb_grpc.KVStub(channel), pb_grpc.WatchStub(channel), pb_grpc.LeaseStub(channel)  # type: ignore[no-untyped-call]
            endpoint = _Endpoint(address, channel, *stubs, pb_grpc.AuthStub(channel))  # type: ignore[no-untyped-call]
            self._endpoints[index] = endpoint
        return endpoint


def _scheme(endpoint: str) -> str:
    """ "http" or "https" as the endpoint names it, "" for host:port."""
    scheme, has_scheme, _ = endpoint.partition("://")
    return scheme if has_scheme else ""


def _address(endpoint: str) -> str:
    """host:port from "host:port", "http://host:port" or "https://host:port"."""
    scheme, has_scheme, address = endpoint.partition("://")
    if not has_scheme:
        scheme, address = "http", endpoint
    _, colon, port = address.rstrip("/").rpartition(":")
    if scheme not in ("http", "https") or not colon or not port.isdigit():
        raise ValueError(f"etcd endpoint {endpoint!r} is not host:port, http://host:port or https://host:port")
    return address.rstrip("/")


def _refuses_token(details: str) -> bool:
    return any(refusal in details for refusal in _TOKEN_REFUSALS)


def _metadata(token: str) -> _Metadata:
    return (("token", token),) if token else ()


def _prefix_range(prefix: str) -> tuple[bytes, bytes]:
    """etcd's [key, range_end) for every key that starts with prefix."""
    if not prefix:
        return b"\0", b"\0"  # etcd's notation for every key
    key = prefix.encode()
    # The last byte of UTF-8 is never 0xff, so adding one to it never carries.
    return key, key[:-1] + bytes([key[-1] + 1])


def _text(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise EtcdError(f"etcd holds a key or value that is not UTF-8: {data[:80]!r}") from None


def _watch_event(event: mvcc.Event) -> WatchEvent:
    kind: Literal["put", "delete"] = "delete" if event.type == mvcc.Event.DELETE else "put"
    return WatchEvent(kind, _text(event.kv.key), _text(event.kv.value), event.kv.mod_revision)
