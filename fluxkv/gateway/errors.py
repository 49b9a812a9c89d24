"""Every answer of the gateway other than 200, in one place: an HTTP status and
a JSON body `{"error": <for people>, "code": <for programs>, ...}`. The code is
the gRPC status name of the failure (the nodes' own, or the one the gateway's
refusal stands for), so HTTP and gRPC callers handle the same kinds."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus

import grpc
import orjson
from starlette.responses import Response

from fluxkv.client import ConditionFailed, FluxKVError

# A node's failure, by its status code, as the gateway answers it; any other code is a 500.
HTTP_STATUS: Mapping[grpc.StatusCode, HTTPStatus] = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.ABORTED: HTTPStatus.CONFLICT,
    # A node's size limit (an answer over FLUX_MAX_MESSAGE_BYTES); the gateway's rate limit is a 429.
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    # A watch's start revision is no longer in a node's history.
    grpc.StatusCode.OUT_OF_RANGE: HTTPStatus.GONE,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
    grpc.StatusCode.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
}

# Flux-KV's gateway's texts for its two refusals, kept for its users' log searches and alerts.
RATE_LIMITED = "request limited"
BREAKER_OPEN = "Service Unavailable (Circuit Breaker Triggered)"


class ApiError(Exception):
    """An answer other than 200: its status, message, code, extra body fields and headers."""

    def __init__(
        self,
        status: HTTPStatus,
        message: str,
        code: str,
        *,
        headers: Mapping[str, str] | None = None,
        **fields: object,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.fields = fields

    def body(self) -> dict[str, object]:
        return {"error": self.message, "code": self.code, **self.fields}

    def response(self) -> Response:
        return Response(orjson.dumps(self.body()), self.status, self.headers, media_type="application/json")


def from_node(exc: FluxKVError) -> ApiError:
    """A node's (or the SDK's) failure as the gateway answers it."""
    status = HTTP_STATUS.get(exc.code, HTTPStatus.INTERNAL_SERVER_ERROR)
    headers = {"WWW-Authenticate": "Bearer"} if status == HTTPStatus.UNAUTHORIZED else None
    if isinstance(exc, ConditionFailed):
        return ApiError(status, exc.message, exc.code.name, headers=headers, revision=exc.revision)
    return ApiError(status, exc.message, exc.code.name, headers=headers)


def bad_request(message: str) -> ApiError:
    return ApiError(HTTPStatus.BAD_REQUEST, message, grpc.StatusCode.INVALID_ARGUMENT.name)


def not_found(key: str) -> ApiError:
    return ApiError(HTTPStatus.NOT_FOUND, f"key {key!r} not found", grpc.StatusCode.NOT_FOUND.name, key=key)


def rate_limited(rate: float) -> ApiError:
    return ApiError(
        HTTPStatus.TOO_MANY_REQUESTS,
        RATE_LIMITED,
        grpc.StatusCode.RESOURCE_EXHAUSTED.name,
        headers={"Retry-After": "1"},
        detail=f"over FLUX_GATEWAY_RATE_LIMIT ({rate:g} requests a second) and its burst",
    )


def breaker_open(retry_after_s: float, detail: str) -> ApiError:
    return ApiError(
        HTTPStatus.SERVICE_UNAVAILABLE,
        BREAKER_OPEN,
        grpc.StatusCode.UNAVAILABLE.name,
        headers={"Retry-After": str(max(1, round(retry_after_s)))},
        detail=detail,
    )
