"""Who may call what: the role each method needs, the keys its request names,
and the checks a call's token goes through, with the counts of refusals by
reason and token (docs/security.md: "Permission table").

Pure logic on requests' fields: the server wraps each handler with these
checks (fluxkv/server/auth.py) and serves the refusals as their status codes.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fluxkv.core.errors import ErrorKind, KVError, shown
from fluxkv.security import tokens
from fluxkv.security.tokens import Role, Token, Tokens


class Keys(enum.Enum):
    """Which keys a request names: the ones a token's prefixes must cover."""

    NONE = "none"  # no key (Info, RewriteAof)
    KEY = "key"  # request.key
    KEYS = "keys"  # request.keys (MultiGet)
    ITEMS = "items"  # request.items[i].key (MultiSet)
    PREFIX = "prefix"  # request.prefix: every key under it (Scan, Watch)


@dataclass(frozen=True, slots=True)
class Rule:
    role: Role
    keys: Keys


READ, WRITE, ADMIN = Role.READ, Role.WRITE, Role.ADMIN

# Every method a node serves, by its path; a method without a rule cannot be served with tokens on.
RULES: Mapping[str, Rule] = {
    "fluxkv.v1.KV/Get": Rule(READ, Keys.KEY),
    "fluxkv.v1.KV/MultiGet": Rule(READ, Keys.KEYS),
    "fluxkv.v1.KV/Scan": Rule(READ, Keys.PREFIX),
    "fluxkv.v1.KV/Watch": Rule(READ, Keys.PREFIX),
    "fluxkv.v1.KV/Info": Rule(READ, Keys.NONE),
    "fluxkv.v1.KV/Set": Rule(WRITE, Keys.KEY),
    "fluxkv.v1.KV/Delete": Rule(WRITE, Keys.KEY),
    "fluxkv.v1.KV/MultiSet": Rule(WRITE, Keys.ITEMS),
    "fluxkv.v1.KV/RewriteAof": Rule(ADMIN, Keys.NONE),
    "service.KVService/Get": Rule(READ, Keys.KEY),
    "service.KVService/Set": Rule(WRITE, Keys.KEY),
    "service.KVService/Del": Rule(WRITE, Keys.KEY),
}

# Why a call was refused: the `reason` label of fluxkv_auth_refused_total.
NO_TOKEN = "no_token"  # no authorization metadata
NOT_BEARER = "not_bearer"  # authorization that is not "Bearer <token>"
UNKNOWN_TOKEN = "unknown_token"  # a token no table of the file names
ROLE = "role"  # a method (or admin page) the token's role does not allow
PREFIX = "prefix"  # a key, Scan prefix or Watch prefix outside the token's prefixes
REASONS = (NO_TOKEN, NOT_BEARER, UNKNOWN_TOKEN, ROLE, PREFIX)

SEND_TOKEN = "send the metadata 'authorization: Bearer <token>'"


class Authorizer:
    """The tokens in force (swapped whole by a reload) and the checks of a call
    against them. A refusal is a KVError (UNAUTHENTICATED or PERMISSION_DENIED)
    whose message names what was refused and never holds the secret; each one
    is counted in `refused` by (reason, token name; "" when no token matched),
    each accepted call in `accepted` by token name."""

    def __init__(self, loaded: Tokens, source: str) -> None:
        self.tokens = loaded
        self.source = source
        self.refused: dict[tuple[str, str], int] = {}
        self.accepted: dict[str, int] = dict.fromkeys(loaded.names, 0)

    def replace(self, loaded: Tokens) -> None:
        self.tokens = loaded
        for name in loaded.names:
            self.accepted.setdefault(name, 0)

    def identify(self, authorization: str | bytes | None) -> Token:
        """The token that a call's `authorization` metadata (None: absent) carries."""
        if authorization is None:
            raise self._refuse(NO_TOKEN, "", ErrorKind.UNAUTHENTICATED, f"this node needs a token: {SEND_TOKEN}")
        secret = tokens.bearer(authorization)
        if secret is None:
            message = f"the authorization metadata is not a Bearer token: {SEND_TOKEN}"
            raise self._refuse(NOT_BEARER, "", ErrorKind.UNAUTHENTICATED, message)
        token = self.tokens.match(secret)
        if token is None:
            raise self._refuse(
                UNKNOWN_TOKEN,
                "",
                ErrorKind.UNAUTHENTICATED,
                f"this node does not know the token sent (its {self.source} names no such token)",
            )
        self.accepted[token.name] += 1
        return token

    def deny_role(self, token: Token, what: str, needed: Role) -> KVError:
        """The refusal of `what` (a method or page) to a token whose role is below `needed`."""
        return self._refuse(
            ROLE,
            token.name,
            ErrorKind.PERMISSION_DENIED,
            f"token {token.name!r} (role {token.role.label}) may not call {what}: it needs role {needed.label}",
        )

    def check_keys(self, token: Token, method: str, keys: Keys, request: Any) -> None:
        """PERMISSION_DENIED unless the token's prefixes cover every key (or the prefix) that
        `request` of `method` names; a batch is refused whole for one key outside."""
        prefixes = token.prefixes
        if prefixes is None or keys is Keys.NONE:
            return
        if keys is Keys.KEY:
            key = request.key
            if not key.startswith(prefixes):
                raise self._outside(token, method, f"key {shown(key)}")
        elif keys is Keys.PREFIX:
            prefix = request.prefix
            if not prefix.startswith(prefixes):
                what = f"prefix {shown(prefix)}" if prefix else "every key (an empty prefix)"
                raise self._outside(token, method, what)
        elif keys is Keys.KEYS:
            for i, key in enumerate(request.keys):
                if not key.startswith(prefixes):
                    raise self._outside(token, method, f"keys[{i}], key {shown(key)}", whole=True)
        else:
            for i, item in enumerate(request.items):
                if not item.key.startswith(prefixes):
                    raise self._outside(token, method, f"items[{i}], key {shown(item.key)}", whole=True)

    def _outside(self, token: Token, method: str, what: str, whole: bool = False) -> KVError:
        call = method.rsplit("/", 1)[-1]
        refused = f"; the whole {call} is refused" if whole else ""
        return self._refuse(
            PREFIX,
            token.name,
            ErrorKind.PERMISSION_DENIED,
            f"token {token.name!r} may not touch {what} in {method}: it may touch keys under "
            f"{token.describe_prefixes()}{refused}",
        )

    def _refuse(self, reason: str, name: str, kind: ErrorKind, message: str) -> KVError:
        key = (reason, name)
        self.refused[key] = self.refused.get(key, 0) + 1
        return KVError(kind, message)
