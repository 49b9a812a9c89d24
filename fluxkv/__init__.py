"""FluxKV: a sharded in-memory key-value node served over gRPC, and its client
SDK (`from fluxkv import Client, SyncClient`; see fluxkv/client.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fluxkv.version import __version__

if TYPE_CHECKING:
    from fluxkv.client import (
        Client,
        ConditionFailed,
        DeadlineExceeded,
        Deleted,
        FluxKVError,
        InvalidRequest,
        KeyValue,
        NodeSource,
        NoNodes,
        PermissionDenied,
        Retry,
        SetItem,
        SetResult,
        StaticNodes,
        SyncClient,
        SyncWatch,
        Unauthenticated,
        Unavailable,
        Watch,
        WatchEvent,
    )
    from fluxkv.cluster.discovery import EtcdNodes
    from fluxkv.security.tls import TLS

__all__ = [
    "TLS",
    "Client",
    "ConditionFailed",
    "DeadlineExceeded",
    "Deleted",
    "EtcdNodes",
    "FluxKVError",
    "InvalidRequest",
    "KeyValue",
    "NoNodes",
    "NodeSource",
    "PermissionDenied",
    "Retry",
    "SetItem",
    "SetResult",
    "StaticNodes",
    "SyncClient",
    "SyncWatch",
    "Unauthenticated",
    "Unavailable",
    "Watch",
    "WatchEvent",
    "__version__",
]


def __getattr__(name: str) -> Any:
    """The client SDK, imported on first use: `import fluxkv` alone loads no gRPC."""
    if name in __all__:
        from fluxkv import client

        return getattr(client, name)
    raise AttributeError(f"module 'fluxkv' has no attribute {name!r}")
