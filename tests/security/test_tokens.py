"""The tokens file and the permission rules as pure logic: parsing and its
messages, `fluxkv token new`'s tables, Bearer values, constant-time matching
over every digest, and the rules covering every method the node serves."""

from __future__ import annotations

import hmac
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluxkv.core.errors import ErrorKind, KVError
from fluxkv.proto import compat_kv_pb2, kv_pb2
from fluxkv.security import permissions, tokens
from fluxkv.security.permissions import RULES, Authorizer, Keys
from fluxkv.security.tokens import Role, Token, Tokens, TokensFileError

D1, D2 = tokens.digest("one").hex(), tokens.digest("two").hex()


def test_a_good_file_parses_into_tokens() -> None:
    text = f"""
# comments are fine
[[token]]
name = "orders-service"
sha256 = "{D1.upper()}"
role = "write"
prefixes = ["orders/", "carts/"]

[[token]]
name = "ops"
sha256 = "{D2}"
role = "admin"
"""
    first, second = tokens.parse(text.encode(), "t.toml")
    assert first == Token("orders-service", tokens.digest("one"), Role.WRITE, ("orders/", "carts/"))
    assert second == Token("ops", tokens.digest("two"), Role.ADMIN, None)
    assert tokens.parse(b"", "empty.toml") == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"[[token]]\nname = 'a'\nrole =\n", "t.toml is not valid TOML: Invalid value (at line 3, column 7)"),
        (b"\xff", "t.toml is not UTF-8 (byte 0)"),
        (b"[token]\nname = 'a'\n", "`token` must be an array of tables ([[token]])"),
        (b"[[tokens]]\nname = 'a'\n", "unknown top-level key 'tokens'"),
        (b"[[token]]\nname = ''\n", "t.toml: [[token]] #1: `name` must be a non-empty string"),
        (f"[[token]]\nname = 'a'\nsha256 = '{D1[:-1]}'\nrole = 'read'\n".encode(), "`sha256` must be 64 hex digits"),
        (f"[[token]]\nname = 'a'\nsha256 = '{D1[:-1]}z'\nrole = 'read'\n".encode(), "got a non-hex character"),
        (
            f"[[token]]\nname = 'a'\nsha256 = '{D1}'\nrole = 'root'\n".encode(),
            "#1 ('a'): unknown role 'root'",
        ),
        (f"[[token]]\nname = 'a'\nsha256 = '{D1}'\n".encode(), "unknown role None"),
        (f"[[token]]\nname = 'a'\nsha256 = '{D1}'\nrole = 'read'\nprefixes = []\n".encode(), "leave it out"),
        (f"[[token]]\nname = 'a'\nsha256 = '{D1}'\nrole = 'read'\nprefixes = [1]\n".encode(), "`prefixes` holds 1"),
        (f"[[token]]\nname = 'a'\nsha256 = '{D1}'\nrole = 'read'\nkeys = ['x']\n".encode(), "unknown field 'keys'"),
        (
            f"[[token]]\nname = 'a'\nsha256 = '{D1}'\nrole = 'read'\n[[token]]\nname = 'b'\nsha256 = '{D1.upper()}'\n"
            "role = 'admin'\n".encode(),
            "[[token]] #2 ('b') has the same sha256 as 'a': a digest names one token",
        ),
        (
            f"[[token]]\nname = 'a'\nsha256 = '{D1}'\nrole = 'read'\n[[token]]\nname = 'a'\nsha256 = '{D2}'\n"
            "role = 'read'\n".encode(),
            "[[token]] #2 ('a'): another token has that name",
        ),
    ],
)
def test_a_bad_file_is_refused_with_where_and_why(text: bytes, message: str) -> None:
    with pytest.raises(TokensFileError) as refused:
        tokens.parse(text, "t.toml")
    assert message in str(refused.value)


names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1).filter(lambda s: s.strip() != "")
prefix_lists = st.lists(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1), max_size=3)


@given(names, st.sampled_from(list(Role)), prefix_lists)
def test_a_new_tokens_table_parses_back_to_its_token(name: str, role: Role, prefixes: list[str]) -> None:
    secret = tokens.new_secret()
    table = tokens.toml_table(name, secret, role, prefixes)
    assert secret not in table
    [token] = tokens.parse(table.encode(), "new")
    assert token == Token(name, tokens.digest(secret), role, tuple(prefixes) if prefixes else None)
    assert Tokens([token]).match(secret) == token


def test_new_secrets_are_random_and_long() -> None:
    secrets = {tokens.new_secret() for _ in range(100)}
    assert len(secrets) == 100
    assert all(len(s) == 43 for s in secrets)


@pytest.mark.parametrize(
    ("value", "secret"),
    [
        ("Bearer abc", "abc"),
        ("bearer abc", "abc"),
        ("BEARER   abc  ", "abc"),
        (b"Bearer abc", "abc"),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic abc", None),
        ("abc", None),
        ("Bearer ab\u00e9", None),
        (b"Bearer \xff", None),
        (None, None),
    ],
)
def test_bearer(value: str | bytes | None, secret: str | None) -> None:
    assert tokens.bearer(value) == secret


def test_matching_compares_every_digest_even_after_a_match(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = Tokens([Token(f"t{i}", tokens.digest(f"s{i}"), Role.READ, None) for i in range(5)])
    compared: list[bytes] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(b)
        return real(a, b)

    monkeypatch.setattr(tokens.hmac, "compare_digest", counting)
    assert loaded.match("s0") is not None and loaded.match("s0").name == "t0"
    assert len(compared) == 10  # 5 for each call: no early exit on the first token
    compared.clear()
    assert loaded.match("nope") is None
    assert len(compared) == 5


def test_every_served_method_has_a_rule() -> None:
    served = {
        f"{service.full_name}/{method.name}"
        for module in (kv_pb2, compat_kv_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert served == set(RULES)


def _token(prefixes: tuple[str, ...] | None) -> Token:
    return Token("t", tokens.digest("s"), Role.ADMIN, prefixes)


@pytest.mark.parametrize(
    ("keys", "request_", "allowed"),
    [
        (Keys.KEY, kv_pb2.GetRequest(key="a/1"), True),
        (Keys.KEY, kv_pb2.GetRequest(key="b/1"), True),
        (Keys.KEY, kv_pb2.GetRequest(key="c/1"), False),
        (Keys.KEY, kv_pb2.GetRequest(key="a"), False),
        (Keys.KEYS, kv_pb2.MultiGetRequest(keys=["a/1", "b/2"]), True),
        (Keys.KEYS, kv_pb2.MultiGetRequest(keys=["a/1", "c/2"]), False),
        (Keys.KEYS, kv_pb2.MultiGetRequest(), True),
        (Keys.ITEMS, kv_pb2.MultiSetRequest(items=[kv_pb2.SetRequest(key="b/")]), True),
        (Keys.ITEMS, kv_pb2.MultiSetRequest(items=[kv_pb2.SetRequest(key="a/"), kv_pb2.SetRequest(key="")]), False),
        (Keys.PREFIX, kv_pb2.ScanRequest(prefix="a/x"), True),
        (Keys.PREFIX, kv_pb2.ScanRequest(prefix="a"), False),
        (Keys.PREFIX, kv_pb2.WatchRequest(prefix=""), False),
        (Keys.NONE, kv_pb2.InfoRequest(), True),
    ],
)
def test_key_checks(keys: Keys, request_: object, allowed: bool) -> None:
    authorizer = Authorizer(Tokens([]), "test")
    authorizer.check_keys(_token(None), "m", keys, request_)  # no prefixes: every key
    if allowed:
        authorizer.check_keys(_token(("a/", "b/")), "m", keys, request_)
        assert authorizer.refused == {}
    else:
        with pytest.raises(KVError) as refused:
            authorizer.check_keys(_token(("a/", "b/")), "m", keys, request_)
        assert refused.value.kind is ErrorKind.PERMISSION_DENIED
        assert "it may touch keys under 'a/', 'b/'" in refused.value.message
        assert authorizer.refused == {(permissions.PREFIX, "t"): 1}


def test_identify_counts_each_refusal_by_reason_and_each_match_by_name() -> None:
    authorizer = Authorizer(Tokens([Token("t", tokens.digest("s"), Role.READ, None)]), "FLUX_AUTH_TOKENS_FILE")
    assert authorizer.identify("Bearer s").name == "t"
    for value in (None, "Basic s", "Bearer x", b"Bearer x"):
        with pytest.raises(KVError) as refused:
            authorizer.identify(value)
        assert refused.value.kind is ErrorKind.UNAUTHENTICATED
    assert authorizer.refused == {("no_token", ""): 1, ("not_bearer", ""): 1, ("unknown_token", ""): 2}
    assert authorizer.accepted == {"t": 1}
    # A reload keeps the counts of the names that stay and starts new ones at 0.
    authorizer.replace(Tokens([Token("u", tokens.digest("s2"), Role.READ, None)]))
    assert authorizer.accepted == {"t": 1, "u": 0}


def test_the_tables_in_docs_security_md_are_valid_tokens_files() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", text, re.S)
    assert blocks
    for block in blocks:
        assert tokens.parse(block.encode(), "docs/security.md")
    [orders, *_] = tokens.parse(blocks[0].encode(), "docs/security.md")
    assert orders.digest == tokens.digest("orders-token-example")
