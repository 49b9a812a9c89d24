"""Tokens on a node (FLUX_AUTH_TOKENS_FILE): the handlers wrapped with the
checks of fluxkv/security/permissions.py, the admin port's pages likewise,
reflection's gate, SIGHUP's reload and the metrics of it all.

With no tokens file the node wraps nothing: this module costs nothing then.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fluxkv.core.errors import ErrorKind, KVError
from fluxkv.obs.admin import HttpError, Page, Request, Response
from fluxkv.obs.metrics import Family, gauge
from fluxkv.rpc import call_context
from fluxkv.security import tokens
from fluxkv.security.permissions import RULES, Authorizer, Keys
from fluxkv.security.tokens import Role, Tokens, TokensFileError

log = logging.getLogger("fluxkv.auth")

TOKENS_SETTING = "FLUX_AUTH_TOKENS_FILE"
_AUTHORIZATION = call_context.AUTHORIZATION


def load_tokens(path: str) -> Tokens:
    """The tokens file at `path`; TokensFileError (its message names the file and the problem) if it is bad."""
    return Tokens(tokens.load(path))


class NodeAuth:
    """A node's tokens: the Authorizer its wrapped handlers and pages check calls with, and its reload."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.authorizer = Authorizer(load_tokens(path), TOKENS_SETTING)
        self.reloads = {"ok": 0, "refused": 0}
        loaded = self.authorizer.tokens
        log.info(
            "calls need a token: %d tokens from %s (%s)",
            len(loaded),
            path,
            ", ".join(loaded.names) or "none",
            extra={"event": "tokens_loaded", "tokens": len(loaded)},
        )

    def reload(self) -> None:
        """Read the file again (SIGHUP): a good one replaces the tokens, a bad one is refused and
        the tokens in force stay. One log line either way."""
        before = len(self.authorizer.tokens)
        try:
            loaded = load_tokens(self.path)
        except TokensFileError as exc:
            self.reloads["refused"] += 1
            log.error(
                "tokens not reloaded, keeping the %d loaded before: invalid %s: %s",
                before,
                TOKENS_SETTING,
                exc,
                extra={"event": "tokens_reload_refused"},
            )
            return
        self.authorizer.replace(loaded)
        self.reloads["ok"] += 1
        log.info(
            "tokens reloaded from %s: %d tokens (%s), %d before",
            self.path,
            len(loaded),
            ", ".join(loaded.names) or "none",
            before,
            extra={"event": "tokens_reloaded", "tokens": len(loaded)},
        )

    def describe(self) -> str:
        loaded = self.authorizer.tokens
        return (
            f"{len(loaded)} tokens from {self.path} ({', '.join(loaded.names) or 'none'}); "
            f"{sum(self.authorizer.refused.values())} calls refused; SIGHUP reloads"
        )

    # -- gRPC ----------------------------------------------------------------

    def guard(self, services: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """`services` ({"pkg.Service": {"Method": handler}}) with every handler behind the checks of
        its method's rule. A method without a rule is an error: none is served unchecked."""
        guarded: dict[str, dict[str, Any]] = {}
        for service, handlers in services.items():
            guarded[service] = {}
            for name, handler in handlers.items():
                path = f"{service}/{name}"
                rule = RULES.get(path)
                if rule is None:
                    raise ValueError(f"{path} has no rule in fluxkv/security/permissions.py: RULES")
                wrap = _guard_unary if inspect.iscoroutinefunction(handler) else _guard_stream
                guarded[service][name] = wrap(self.authorizer, path, rule.role, rule.keys, handler)
        return guarded

    def check_metadata(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> None:
        """Any valid token (for reflection); KVError otherwise."""
        self.authorizer.identify(call_context.value_in(metadata, _AUTHORIZATION))

    # -- the admin port --------------------------------------------------------

    def page(self, page: Page, needed: Role | None, what: str) -> Page:
        """`page` behind a token: any valid one (`needed` None) or one of at least role `needed`.
        401 without a valid token, 403 for a lower role."""
        authorizer = self.authorizer
        handler = page.handler

        async def checked(request: Request) -> Response:
            try:
                token = authorizer.identify(request.headers.get("authorization"))
                if needed is not None and token.role < needed:
                    raise authorizer.deny_role(token, what, needed)
            except KVError as exc:
                if exc.kind is ErrorKind.UNAUTHENTICATED:
                    raise HttpError(
                        HTTPStatus.UNAUTHORIZED, exc.message, {"WWW-Authenticate": 'Bearer realm="fluxkv"'}
                    ) from None
                raise HttpError(HTTPStatus.FORBIDDEN, exc.message) from None
            return await handler(request)

        return Page(checked, page.about)

    # -- metrics ----------------------------------------------------------------

    def collect(self) -> list[Family]:
        a = self.authorizer
        refused = Family(
            "fluxkv_auth_refused_total",
            "counter",
            "Calls and admin requests refused for their token, by reason and token name (empty: no token matched).",
        )
        for (reason, name), count in sorted(a.refused.items()):
            refused.add(count, reason=reason, token=name)
        accepted = Family(
            "fluxkv_auth_accepted_total", "counter", "Calls and admin requests whose token matched, by token name."
        )
        for name, count in sorted(a.accepted.items()):
            accepted.add(count, token=name)
        reloads = Family("fluxkv_auth_reloads_total", "counter", "SIGHUP reloads of the tokens file, by result.")
        for result, count in self.reloads.items():
            reloads.add(count, result=result)
        return [
            gauge("fluxkv_auth_tokens", "Tokens loaded from FLUX_AUTH_TOKENS_FILE.", len(a.tokens)),
            refused,
            accepted,
            reloads,
        ]


def _guard_unary(
    authorizer: Authorizer, path: str, needed: Role, keys: Keys, handler: Callable[[Any], Awaitable[Any]]
) -> Callable[[Any], Awaitable[Any]]:
    identify, check_keys, metadata_value = authorizer.identify, authorizer.check_keys, call_context.metadata_value

    async def checked(request: Any) -> Any:
        token = identify(metadata_value(_AUTHORIZATION))
        if token.role < needed:
            raise authorizer.deny_role(token, path, needed)
        if token.prefixes is not None:
            check_keys(token, path, keys, request)
        return await handler(request)

    return checked


def _guard_stream(
    authorizer: Authorizer,
    path: str,
    needed: Role,
    keys: Keys,
    handler: Callable[[Any], AsyncGenerator[Any, None]],
) -> Callable[[Any], AsyncGenerator[Any, None]]:
    def checked(request: Any) -> AsyncGenerator[Any, None]:
        token = authorizer.identify(call_context.metadata_value(_AUTHORIZATION))
        if token.role < needed:
            raise authorizer.deny_role(token, path, needed)
        authorizer.check_keys(token, path, keys, request)
        return handler(request)

    return checked
