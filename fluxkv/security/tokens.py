"""The tokens file (FLUX_AUTH_TOKENS_FILE): TOML tables that name a token by the
SHA-256 of its secret, never the secret itself, with a role and the key
prefixes it may touch (docs/security.md):

    [[token]]
    name = "orders-service"
    sha256 = "<hex SHA-256 of the token's UTF-8 bytes>"
    role = "write"
    prefixes = ["orders/"]

Parsing and validating the file, making new tokens, and telling which token a
call's `authorization: Bearer <token>` carries. Pure logic: no gRPC, no files
other than the one given, no clock.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# 32 random bytes, URL-safe base64: 43 characters.
SECRET_BYTES = 32
_FIELDS = {"name", "sha256", "role", "prefixes"}


class Role(enum.IntEnum):
    """What a token may call; each role may do all that the ones below it may."""

    READ = 1
    WRITE = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


ROLES = {role.label: role for role in Role}


class TokensFileError(ValueError):
    """The tokens file cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Token:
    """One table of the file. `prefixes` None: every key."""

    name: str
    digest: bytes
    role: Role
    prefixes: tuple[str, ...] | None

    def describe_prefixes(self) -> str:
        if self.prefixes is None:
            return "every key"
        return ", ".join(repr(p) for p in self.prefixes)


def digest(secret: str) -> bytes:
    """The SHA-256 of a token's UTF-8 bytes, as the file names it (in hex)."""
    return hashlib.sha256(secret.encode()).digest()


def new_secret() -> str:
    """A fresh random token."""
    return secrets.token_urlsafe(SECRET_BYTES)


def toml_table(name: str, secret: str, role: Role, prefixes: Sequence[str] = ()) -> str:
    """The file's table for `secret` (which it does not contain)."""
    lines = [
        "[[token]]",
        f"name = {_toml_string(name)}",
        f'sha256 = "{digest(secret).hex()}"',
        f'role = "{role.label}"',
    ]
    if prefixes:
        lines.append(f"prefixes = [{', '.join(_toml_string(p) for p in prefixes)}]")
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    """`text` as a TOML basic string: backslash and quote escaped, control characters as \\uXXXX."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c >= " " and c != "\x7f" else f"\\u{ord(c):04x}" for c in escaped) + '"'


def load(path: str) -> tuple[Token, ...]:
    """Read and validate the file at `path`; TokensFileError if it cannot be used."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TokensFileError(f"cannot read {path}: {exc.strerror}") from None
    return parse(data, path)


def parse(data: bytes, source: str) -> tuple[Token, ...]:
    """Validate a tokens file's bytes (`source` names it in messages)."""
    try:
        document = tomllib.loads(data.decode())
    except UnicodeDecodeError as exc:
        raise TokensFileError(f"{source} is not UTF-8 (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message names the line and column: "... (at line 3, column 7)".
        raise TokensFileError(f"{source} is not valid TOML: {exc}") from None
    extra = sorted(set(document) - {"token"})
    if extra:
        raise TokensFileError(f"{source}: unknown top-level key {extra[0]!r}; the file holds [[token]] tables")
    tables = document.get("token", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise TokensFileError(f"{source}: `token` must be an array of tables ([[token]])")
    tokens: list[Token] = []
    digests: dict[bytes, str] = {}
    names: set[str] = set()
    for i, table in enumerate(tables):
        token = _token(table, f"{source}: [[token]] #{i + 1}")
        where = f"{source}: [[token]] #{i + 1} ({token.name!r})"
        if token.digest in digests:
            raise TokensFileError(f"{where} has the same sha256 as {digests[token.digest]!r}: a digest names one token")
        if token.name in names:
            raise TokensFileError(f"{where}: another token has that name; names tell tokens apart in logs and metrics")
        digests[token.digest] = token.name
        names.add(token.name)
        tokens.append(token)
    return tuple(tokens)


def _token(table: dict[str, Any], where: str) -> Token:
    unknown = sorted(set(table) - _FIELDS)
    if unknown:
        raise TokensFileError(f"{where}: unknown field {unknown[0]!r} (fields: name, sha256, role, prefixes)")
    name = table.get("name")
    if not isinstance(name, str) or not name.strip():
        raise TokensFileError(f"{where}: `name` must be a non-empty string")
    where = f"{where} ({name!r})"
    hexdigest = table.get("sha256")
    if not isinstance(hexdigest, str) or len(hexdigest) != 64:
        raise TokensFileError(f"{where}: `sha256` must be 64 hex digits (the SHA-256 of the token, not the token)")
    try:
        raw = bytes.fromhex(hexdigest)
    except ValueError:
        raise TokensFileError(f"{where}: `sha256` must be 64 hex digits, got a non-hex character") from None
    role = table.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise TokensFileError(f"{where}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
    prefixes = table.get("prefixes")
    if prefixes is not None:
        if not isinstance(prefixes, list) or not prefixes:
            raise TokensFileError(
                f"{where}: `prefixes` must be a non-empty list of key prefixes; leave it out for every key"
            )
        for p in prefixes:
            if not isinstance(p, str) or not p:
                raise TokensFileError(
                    f"{where}: `prefixes` holds {p!r}; each must be a non-empty string (leave `prefixes` out "
                    "for every key)"
                )
        prefixes = tuple(prefixes)
    return Token(name, raw, ROLES[role], prefixes)


class Tokens:
    """The tokens a node accepts, and which of them a call's authorization carries."""

    __slots__ = ("_tokens", "names")

    def __init__(self, tokens: Sequence[Token]) -> None:
        self._tokens = tuple(tokens)
        self.names = tuple(t.name for t in tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def match(self, secret: str) -> Token | None:
        """The token whose digest is `secret`'s; None if none is. Every digest is compared,
        each in constant time, so that the time taken says nothing of which one matched or how
        close another came."""
        d = hashlib.sha256(secret.encode()).digest()
        found = None
        for token in self._tokens:
            if hmac.compare_digest(d, token.digest):
                found = token
        return found


def bearer(value: str | bytes | None) -> str | None:
    """The token of an `authorization` value "Bearer <token>" (the scheme in any case, as
    RFC 7235 has it); None if the value is not of that form. An empty token is none."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    elif not value.isascii():
        return None
    scheme, _, secret = value.strip().partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret:
        return None
    return secret
