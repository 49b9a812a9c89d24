"""The CDC event schema (version 1): how a change record is written as JSON
for RabbitMQ, and read back by consumers. README "CDC event schema" documents
the same fields.

An AMQP message body is a JSON array of events of one node, in revision order.
An event is an object:

    {"v": 1, "op": "set", "node": "kv-1:50052", "epoch": "9f2c4e1a0b7d3e55",
     "rev": 42, "shard": 17, "ts_ms": 1763800000000, "key": "user:1",
     "value": "text", "expires_at_ms": 1763800060000}

`value` holds a value that is valid UTF-8; any other value is in `value_b64`
(standard base64) instead. `op` "set" has exactly one of them; "del" and
"expire" have neither. `expires_at_ms` is present only for a "set" with a TTL.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from fluxkv.changes import ChangeRecord, Op

SCHEMA_VERSION = 1
CONTENT_TYPE = "application/json"


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
    value = record.value
    if value is not None:
        try:
            event["value"] = value.decode()
        except UnicodeDecodeError:
            event["value_b64"] = base64.b64encode(value).decode()
        if record.expires_at_ms:
            event["expires_at_ms"] = record.expires_at_ms
    return orjson.dumps(event)


def join_events(events: Sequence[bytes]) -> bytes:
    """A message body from encoded events: a JSON array."""
    return b"[" + b",".join(events) + b"]"


class SchemaError(ValueError):
    """A message body that is not a batch of version-1 events."""


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
    """The events of a message body; SchemaError says what is wrong with it."""
    try:
        items = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise SchemaError(f"the body is not JSON: {exc}") from None
    if not isinstance(items, list):
        raise SchemaError(f"the body is a JSON {type(items).__name__}, not an array of events")
    return [_event(item, i) for i, item in enumerate(items)]


def _event(item: Any, index: int) -> Event:
    where = f"event {index}"
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
