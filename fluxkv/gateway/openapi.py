"""The OpenAPI 3.1 document of fluxkv-gateway's routes, served at /openapi.json:
every route, parameter, body and status the gateway answers with. The tests
hold the gateway to it with schemathesis (tests/gateway/test_openapi.py).
"""

from __future__ import annotations

from typing import Any

from fluxkv.config import Settings
from fluxkv.version import __version__

INT64 = {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}
REVISION = {**INT64, "description": "A revision of the node that holds the key (revisions count per node)."}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): {"$ref": f"#/components/responses/{status}"} for status in statuses}


# What every API route may answer besides its own: a bad request, a refused token, the rate limit, the
# breaker (or the nodes unavailable), and a node past its deadline.
_API = (400, 401, 403, 429, 503, 504)


def _query(name: str, schema: dict[str, Any], description: str, *, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "schema": schema, "description": description}


_KEY = _query("key", {"type": "string", "minLength": 1}, "The key.", required=True)
_ENCODING = _query(
    "encoding",
    {"type": "string", "enum": ["utf8", "base64"], "default": "utf8"},
    "How values are written in the JSON bodies: UTF-8 text, or base64 for binary values.",
)


def _operation(
    summary: str,
    ok: dict[str, Any],
    statuses: tuple[int, ...],
    parameters: list[dict[str, Any]] | None = None,
    body: str | None = None,
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {"200": ok, **_errors(*statuses)}}
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    return operation


def document(settings: Settings) -> dict[str, Any]:
    """The document, with the limits of these settings."""
    error_statuses = {
        400: "Bad input: the message says what was wrong.",
        401: "No valid token: the nodes want one (Authorization: Bearer <token>).",
        403: "The token's role or key prefixes do not allow the request.",
        404: "The key does not exist.",
        406: "A value is not UTF-8 text: ask again with ?encoding=base64.",
        409: "The expect_revision condition failed; `revision` is the key's current one (0: absent).",
        410: "The watch's start is no longer in a node's history: scan again and watch from now.",
        413: "The body is over FLUX_GATEWAY_MAX_BODY_BYTES, or an answer over a node's limit.",
        429: "Over the rate limit (FLUX_GATEWAY_RATE_LIMIT): body `request limited`.",
        503: "The circuit breaker is open or too many requests are in flight, or no node is available.",
        504: "No answer from the nodes within FLUX_GATEWAY_TIMEOUT_S.",
    }
    key_value_properties: dict[str, Any] = {
        "key": {"type": "string"},
        "value": {"type": "string"},
        "revision": REVISION,
        "ttl_ms": {**INT64, "description": "The time to live left, in milliseconds; 0: none."},
    }
    key_value = {
        "type": "object",
        "required": ["key", "value", "revision", "ttl_ms"],
        "properties": key_value_properties,
    }
    set_item = {
        "type": "object",
        "required": ["key", "value"],
        "properties": {
            "key": {"type": "string", "minLength": 1},
            "value": {"type": "string"},
            "ttl_ms": {
                **INT64,
                "type": ["integer", "null"],
                "description": "Expire the key this many milliseconds later; 0 or null: never.",
            },
            "expect_revision": {
                **INT64,
                "type": ["integer", "null"],
                "description": "Write only if the key is at this revision (0: only if it is absent; null: always).",
            },
        },
    }
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "required": ["error", "code"],
            "properties": {
                "error": {"type": "string", "description": "What went wrong, for people."},
                "code": {"type": "string", "description": "The gRPC status name of the failure, for programs."},
                "revision": {"type": ["integer", "null"]},
                "key": {"type": "string"},
                "detail": {"type": "string"},
            },
        },
        "KeyValue": key_value,
        "SetItem": set_item,
        "SetAnswer": {
            "type": "object",
            "required": ["message", "key", "value", "revision"],
            "properties": {
                "message": {"const": "success"},
                "key": {"type": "string"},
                "value": {"type": "string"},
                "revision": REVISION,
            },
        },
        "DeleteAnswer": {
            "type": "object",
            "required": ["message", "key", "revision"],
            "properties": {"message": {"const": "deleted"}, "key": {"type": "string"}, "revision": REVISION},
        },
        "MultiGetBody": {
            "type": "object",
            "required": ["keys"],
            "properties": {"keys": {"type": "array", "items": {"type": "string", "minLength": 1}}},
        },
        "MultiGetAnswer": {
            "type": "object",
            "required": ["items"],
            "properties": {
                "items": {
                    "type": "array",
                    "items": {
                        "oneOf": [
                            {
                                "type": "object",
                                "required": ["key", "value", "revision", "ttl_ms", "found"],
                                "properties": {**key_value_properties, "found": {"const": True}},
                            },
                            {
                                "type": "object",
                                "required": ["key", "found"],
                                "properties": {"key": {"type": "string"}, "found": {"const": False}},
                            },
                        ]
                    },
                }
            },
        },
        "MultiSetBody": {
            "type": "object",
            "required": ["items"],
            "properties": {"items": {"type": "array", "items": _ref("SetItem")}},
        },
        "MultiSetAnswer": {
            "type": "object",
            "required": ["results"],
            "properties": {
                "results": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["key", "applied", "revision", "created"],
                        "properties": {
                            "key": {"type": "string"},
                            "applied": {"type": "boolean"},
                            "revision": REVISION,
                            "created": {"type": "boolean"},
                        },
                    },
                }
            },
        },
        "ScanAnswer": {
            "type": "object",
            "required": ["items", "cursor"],
            "properties": {
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["key", "revision", "ttl_ms"],
                        "properties": key_value_properties,
                    },
                },
                "cursor": {"type": "string", "description": "The next page's cursor; empty after the last page."},
            },
        },
    }
    paths = {
        "/health": {
            "get": _operation(
                "The gateway is up: its version, the nodes it routes to, its circuit breaker's state.",
                _json({"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}, "Up."),
                (),
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics (text format 0.0.4).",
                {"description": "The metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}},
                (),
            )
        },
        "/openapi.json": {"get": _operation("This document.", _json({"type": "object"}, "The OpenAPI document."), ())},
        "/api/v1/kv": {
            "get": _operation(
                "Read a key (coalesced with the same read in flight).",
                _json(_ref("KeyValue"), "The key's value, revision and time to live."),
                (*_API, 404, 406, 413),
                [_KEY, _ENCODING],
            ),
            "post": _operation(
                "Write a key: Flux-KV's body, with an optional TTL and compare-and-set condition.",
                _json(_ref("SetAnswer"), "Written; `revision` is the write's."),
                (*_API, 409, 413),
                [_ENCODING],
                "SetItem",
            ),
            "delete": _operation(
                "Delete a key.",
                _json(_ref("DeleteAnswer"), "Deleted; `revision` is the deletion's."),
                (*_API, 404, 409),
                [
                    _KEY,
                    _query(
                        "expect_revision",
                        {**INT64, "minimum": 1},
                        "Delete only if the key is at this revision.",
                    ),
                ],
            ),
        },
        "/api/v1/kv/mget": {
            "post": _operation(
                "Read many keys, each from its owner, in the order given.",
                _json(_ref("MultiGetAnswer"), "One item per key."),
                (*_API, 406, 413),
                [_ENCODING],
                "MultiGetBody",
            )
        },
        "/api/v1/kv/mset": {
            "post": _operation(
                "Write many keys, each on its owner; an item whose condition fails is reported, not written.",
                _json(_ref("MultiSetAnswer"), "One result per item, in the order given."),
                (*_API, 413),
                [_ENCODING],
                "MultiSetBody",
            )
        },
        "/api/v1/scan": {
            "get": _operation(
                "One page of the keys under a prefix, node after node.",
                _json(_ref("ScanAnswer"), "A page and the next page's cursor."),
                (*_API, 406, 413),
                [
                    _query("prefix", {"type": "string"}, "Only keys that start with it."),
                    _query("cursor", {"type": "string"}, "The previous page's cursor; empty for the first page."),
                    _query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": settings.max_batch_items, "default": 100},
                        "Most keys in the page.",
                    ),
                    _query("keys_only", {"type": "boolean", "default": False}, "Leave the values out."),
                    _ENCODING,
                ],
            )
        },
        "/api/v1/watch": {
            "get": _operation(
                "The changes under a prefix, as Server-Sent Events: `ready`, then `set`, `delete` and `expire`, "
                "each with a JSON body; each event's id holds every node's position, so an EventSource resumes "
                "with Last-Event-ID. An `error` event (with an Error body and its HTTP status) ends the stream.",
                {
                    "description": "The stream.",
                    "content": {"text/event-stream": {"schema": {"type": "string"}}},
                },
                (*_API, 406, 410),
                [
                    _query("prefix", {"type": "string"}, "Only keys that start with it."),
                    _query(
                        "start_revision",
                        {**INT64, "minimum": 1},
                        "Start at this revision on every node (default: from the next change).",
                    ),
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                        "description": "Resume after this event (an EventSource sends it when it reconnects).",
                    },
                    _ENCODING,
                ],
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fluxkv-gateway",
            "version": __version__,
            "description": "Flux-KV's HTTP API over a FluxKV cluster, each key sent to its owner. Errors are "
            '`{"error": ..., "code": ...}` with the gRPC status name as the code.',
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "responses": {str(status): _json(_ref("Error"), text) for status, text in error_statuses.items()},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }
