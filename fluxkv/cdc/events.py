"""The CDC message bodies: how a change record is written as JSON for
RabbitMQ, and read back by consumers, in the node's two formats
(FLUX_CDC_FORMAT). docs/cdc.md documents the same fields.

Format "fluxkv", the event schema version 1:

An AMQP message body is a JSON array of events of one node, in revision order.
An event is an object:

    {"v": 1, "op": "set", "node": "kv-1:50052", "epoch": "9f2c4e1a0b7d3e55",
     "rev": 42, "shard": 17, "ts_ms": 1763800000000, "key": "user:1",
     "value": "text", "expires_at_ms": 1763800060000}

`value` holds a value that is valid UTF-8; any other value is in `value_b64`
(standard base64) instead. `op` "set" has exactly one of them; "del" and
"expire" have neither. `expires_at_ms` is present only for a "set" with a TTL.

Format "flux-kv", Flux-KV's: a message body is one change, the object Flux-KV's
consumers unmarshal, with FluxKV's members for deduplication after them:

    {"type": 0, "key": "user:1", "value": "text", "rev": 42,
     "node": "kv-1:50052", "epoch": "9f2c4e1a0b7d3e55", "ts_ms": 1763800000000}

`type` 0 is a set, 1 a delete (an expiry too: Flux-KV knows no other kind),
whose `value` is null. A value that is not valid UTF-8 has `value` null and
`value_b64` (standard base64). Read back, such a body is the version-1 event
of what it says (op "set" or "del", the key's shard, no expires_at_ms).
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from fluxkv.core.changes import ChangeRecord, Op
from fluxkv.core.store import shard_of

SCHEMA_VERSION = 1
CONTENT_TYPE = "application/json"
# Flux-KV's event types.
FLUX_KV_SET = 0
FLUX_KV_DELETE = 1


def encode_event(record: ChangeRecord, node: str, epoch: str) -> bytes:
    """One event as JSON (an element of a message body's array)."""
    event: dict[str, Any] = {
        "v": SCHEMA_VERSION,
        "op": record.op.value,
        "node": node,
        "epoch": epoch,
        "rev": record.revision,
        "shard": record.shard,
        "ts_ms": record.ts_ms,
        "key": record.key,
    }
    if record.value is not None:
        _put_value(event, record.value)
        if record.expires_at_ms:
            event["expires_at_ms"] = record.expires_at_ms
    return orjson.dumps(event)


def encode_flux_kv(record: ChangeRecord, node: str, epoch: str) -> bytes:
    """One change as a whole Flux-KV message body."""
    event: dict[str, Any] = {
        "type": FLUX_KV_SET if record.op is Op.SET else FLUX_KV_DELETE,
        "key": record.key,
        "value": None,
        "rev": record.revision,
        "node": node,
        "epoch": epoch,
        "ts_ms": record.ts_ms,
    }
    if record.value is not None:
        _put_value(event, record.value)
    return orjson.dumps(event)


def _put_value(event: dict[str, Any], value: bytes) -> None:
    """`value` as text when it is valid UTF-8, else as `value_b64`."""
    try:
        event["value"] = value.decode()
    except UnicodeDecodeError:
        event["value_b64"] = base64.b64encode(value).decode()


def join_events(events: Sequence[bytes]) -> bytes:
    """A message body from encoded events: a JSON array."""
    return b"[" + b",".join(events) + b"]"


class SchemaError(ValueError):
    """A message body that is neither a batch of version-1 events nor a
    Flux-KV event with FluxKV's members."""


@dataclass(frozen=True, slots=True)
class Event:
    """A decoded event; `value` is the value's bytes for "set", else None."""

    op: Op
    node: str
    epoch: str
    rev: int
    shard: int
    ts_ms: int
    key: str
    value: bytes | None
    expires_at_ms: int
    raw: dict[str, Any]


def decode_batch(body: bytes) -> list[Event]:
    """The events of a message body of either format, told apart by its JSON:
    an array is a batch of version-1 events, an object with `type` a Flux-KV
    event. SchemaError says what is wrong with it."""
    try:
        items = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"the body is not JSON: {exc}") from None
    if isinstance(items, list):
        return [_event(item, f"event {i}") for i, item in enumerate(items)]
    if isinstance(items, dict) and "type" in items:
        return [_event(_from_flux_kv(items), "the Flux-KV event")]
    raise SchemaError(
        f"the body is a JSON {type(items).__name__}, neither an array of events nor a Flux-KV event "
        "(an object with 'type')"
    )


def _from_flux_kv(item: dict[str, Any]) -> dict[str, Any]:
    """The version-1 event that a Flux-KV event says, to be checked as one."""
    kind = item["type"]
    if type(kind) is not int or kind not in (FLUX_KV_SET, FLUX_KV_DELETE):
        raise SchemaError(f"the Flux-KV event has type {kind!r}; expected 0 (set) or 1 (delete)")
    missing = [name for name in ("rev", "node", "epoch", "ts_ms") if name not in item]
    if missing:
        raise SchemaError(
            f"the Flux-KV event lacks FluxKV's {', '.join(missing)}, without which it cannot be deduplicated"
        )
    key = item.get("key")
    if not isinstance(key, str):
        raise SchemaError(f"the Flux-KV event's key should be a string, got {key!r}")
    event = {
        "v": SCHEMA_VERSION,
        "op": (Op.SET if kind == FLUX_KV_SET else Op.DELETE).value,
        "node": item["node"],
        "epoch": item["epoch"],
        "rev": item["rev"],
        "shard": shard_of(key),
        "ts_ms": item["ts_ms"],
        "key": key,
    }
    if item.get("value") is not None:
        event["value"] = item["value"]
    if "value_b64" in item:
        event["value_b64"] = item["value_b64"]
    return event


def _event(item: Any, where: str) -> Event:
    if not isinstance(item, dict):
        raise SchemaError(f"{where} is a JSON {type(item).__name__}, not an object")
    if item.get("v") != SCHEMA_VERSION:
        raise SchemaError(f"{where} has schema version {item.get('v')!r}; this reader knows {SCHEMA_VERSION}")
    try:
        op = Op(item["op"])
        value: bytes | None = None
        if "value" in item:
            value = item["value"].encode()
        elif "value_b64" in item:
            value = base64.b64decode(item["value_b64"], validate=True)
        if (value is None) == (op is Op.SET):
            raise SchemaError(f"{where}: op {op.value!r} {'needs' if value is None else 'must not have'} a value")
        return Event(
            op=op,
            node=_typed(item, "node", str),
            epoch=_typed(item, "epoch", str),
            rev=_typed(item, "rev", int),
            shard=_typed(item, "shard", int),
            ts_ms=_typed(item, "ts_ms", int),
            key=_typed(item, "key", str),
            value=value,
            expires_at_ms=_typed(item, "expires_at_ms", int) if "expires_at_ms" in item else 0,
            raw=item,
        )
    except KeyError as exc:
        raise SchemaError(f"{where} lacks the field {exc}") from None
    except SchemaError:
        raise
    except (ValueError, AttributeError) as exc:  # a bad op, base64 or value type
        raise SchemaError(f"{where}: {exc}") from None


def _typed(item: dict[str, Any], name: str, kind: type) -> Any:
    value = item[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SchemaError(f"field {name!r} should be a {kind.__name__}, got {value!r}")
    return value
