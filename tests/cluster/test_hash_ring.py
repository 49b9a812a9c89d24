"""The consistent-hash ring: the worked example of docs/routing.md, a plain
reading of the rules there, and the ring's properties with hypothesis (keys that
move when a node joins or leaves, balance, order and process independence)."""

from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxkv.cluster import hash_ring
from fluxkv.cluster.hash_ring import HashRing
from tests.conftest import ROOT

DOC = ROOT / "docs" / "routing.md"
EXAMPLE_NODES = ["10.0.0.1:50052", "10.0.0.2:50052", "10.0.0.3:50052"]
SPACE = 2**64
KEYS = 2000

# A node's share of the ring is the sum of the arcs before its v points among
# n * v random points: Beta(v, (n - 1) * v), whose relative standard deviation
# is sqrt((n - 1) / (n * v + 1)): 6.4% for 3 nodes and 7.5% for 9 with v = 160,
# never above 1/sqrt(160) = 7.9%. A share within 40% of 1/n is over 5 of those:
# a correct ring fails one check with a probability below 1e-6 (the Beta tail:
# 1.5e-9 for 3 nodes, 5e-7 for 9).
TOLERANCE = 0.4

ADDRESSES = st.one_of(
    st.builds(
        "10.{}.{}.{}:{}".format, st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(1, 65535)
    ),
    st.text(min_size=1, max_size=20),
)


def spec_position(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def spec_points(nodes: list[str], vnodes: int) -> list[tuple[int, str]]:
    """Rules 1 and 2: every node's points, by position and then by address."""
    return sorted(
        ((spec_position(f"{node}#{i}"), node) for node in nodes for i in range(vnodes)),
        key=lambda point: (point[0], point[1].encode("utf-8")),
    )


def spec_owner(points: list[tuple[int, str]], key: str) -> str:
    """Rule 3, read literally: the first point at or above the key's position, else the first point."""
    at_or_above = [point for point in points if point[0] >= spec_position(key)]
    return (at_or_above or points)[0][1]


def shares(nodes: list[str], vnodes: int = 160) -> dict[str, float]:
    """Each node's part of the ring: the arcs that end at its points."""
    points = spec_points(nodes, vnodes)
    arcs = dict.fromkeys(nodes, 0)
    previous = points[-1][0] - SPACE  # the first point's arc wraps around
    for position, node in points:
        arcs[node] += position - previous
        previous = position
    return {node: arc / SPACE for node, arc in arcs.items()}


def keys(prefix: str) -> list[str]:
    return [f"{prefix}{i}" for i in range(KEYS)]


def assert_fair(share: float, nodes: int) -> None:
    assert abs(share * nodes - 1) <= TOLERANCE, f"a share of {share:.3f} among {nodes} nodes"


def assert_sampled(moved: int, share: float) -> None:
    """`moved` of KEYS keys against the share they were drawn from: within 6 binomial standard deviations."""
    assert abs(moved / KEYS - share) <= 6 * math.sqrt(share * (1 - share) / KEYS)


# -- docs/routing.md ---------------------------------------------------------------


def test_the_worked_example_of_docs_routing_md_holds() -> None:
    doc = DOC.read_text()
    for node in EXAMPLE_NODES:
        assert f"`{node}`" in doc
    points = re.findall(r"^\| `([^`]+#\d+)` \| `([0-9a-f]{16})` \|", doc, re.MULTILINE)
    assert len(points) == 5
    for label, position in points:
        assert hash_ring.position(label) == int(position, 16), label
    rows = re.findall(
        r"^\| `([^`]+)` \| `([0-9a-f]{16})` \| `([0-9a-f]{16})` \(`([^`]+)#(\d+)`\) \| `([^`]+)` \|$", doc, re.MULTILINE
    )
    assert len(rows) == 7
    ring = HashRing(EXAMPLE_NODES)
    everything = spec_points(EXAMPLE_NODES, 160)
    assert (everything[0][0], everything[-1][0]) == (int(points[3][1], 16), int(points[4][1], 16))
    wrapped = 0
    for key, position, point, node, i, owner in rows:
        assert hash_ring.position(key) == int(position, 16), key
        assert hash_ring.position(f"{node}#{i}") == int(point, 16), key
        assert ring.owner(key) == node == owner, key
        wrapped += int(point, 16) < int(position, 16)
    assert wrapped == 1
    for node, share in shares(EXAMPLE_NODES).items():
        assert f"{share:.1%}" in doc, node


# -- the rules ------------------------------------------------------------------------


@settings(deadline=None)
@given(
    st.lists(ADDRESSES, min_size=1, max_size=6, unique=True),
    st.integers(1, 8),
    st.lists(st.text(max_size=12), min_size=1, max_size=40),
)
def test_the_ring_follows_the_rules_as_written(nodes: list[str], vnodes: int, some_keys: list[str]) -> None:
    # Few points per node, so that keys often wrap around past the largest one.
    ring = HashRing(nodes, vnodes)
    points = spec_points(nodes, vnodes)
    for key in some_keys:
        assert ring.owner(key) == spec_owner(points, key)


def test_a_key_at_a_point_belongs_to_it_and_a_key_past_the_last_point_wraps(monkeypatch: pytest.MonkeyPatch) -> None:
    # x's i-th point at 10 * i, y's at 10 * i + 5; the key "k<n>" at n.
    def fake(text: str) -> int:
        if "#" in text:
            node, i = text.rsplit("#", 1)
            return 10 * int(i) + (5 if node == "y:1" else 0)
        return int(text[1:])

    monkeypatch.setattr(hash_ring, "position", fake)
    ring = HashRing(["y:1", "x:1"], vnodes=3)  # points 0 x, 5 y, 10 x, 15 y, 20 x, 25 y
    owners = {n: ring.owner(f"k{n}") for n in (0, 1, 5, 6, 10, 25, 26, 99)}
    assert owners == {0: "x:1", 1: "y:1", 5: "y:1", 6: "x:1", 10: "x:1", 25: "y:1", 26: "x:1", 99: "x:1"}


def test_a_tie_goes_to_the_address_first_in_utf8_byte_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every node's i-th point at 10 * i; the key "k<n>" at n: all points collide.
    def fake(text: str) -> int:
        return 10 * int(text.rsplit("#", 1)[1]) if "#" in text else int(text[1:])

    monkeypatch.setattr(hash_ring, "position", fake)
    for order in (["b:1", "ä:1", "a:1"], ["a:1", "b:1", "ä:1"], ["ä:1", "a:1", "b:1"]):
        ring = HashRing(order, vnodes=4)
        assert [ring.owner(f"k{n}") for n in (0, 5, 10, 30, 31)] == ["a:1"] * 5
        ring.remove("a:1")
        assert ring.owner("k5") == "b:1"  # "b" (0x62) sorts before "ä" (0xc3 0xa4)


# -- properties -------------------------------------------------------------------------


@settings(deadline=None)
@given(st.lists(ADDRESSES, min_size=2, max_size=9, unique=True), st.text(max_size=8))
def test_a_joining_node_takes_about_one_in_n_plus_1_keys_and_no_other_key_moves(nodes: list[str], prefix: str) -> None:
    *old, new = nodes
    ring = HashRing(old)
    before = [ring.owner(k) for k in keys(prefix)]
    ring.add(new)
    after = [ring.owner(k) for k in keys(prefix)]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert all(a == new for _, a in moved)
    assert len(moved) == after.count(new)
    share = shares(nodes)[new]
    assert_fair(share, len(nodes))
    assert_sampled(len(moved), share)


@settings(deadline=None)
@given(st.lists(ADDRESSES, min_size=2, max_size=9, unique=True), st.text(max_size=8))
def test_a_leaving_node_gives_away_its_keys_and_no_other_key_moves(nodes: list[str], prefix: str) -> None:
    gone = nodes[0]
    ring = HashRing(nodes)
    before = [ring.owner(k) for k in keys(prefix)]
    ring.remove(gone)
    after = [ring.owner(k) for k in keys(prefix)]
    for b, a in zip(before, after, strict=True):
        assert a == b if b != gone else a != gone
    share = shares(nodes)[gone]
    assert_fair(share, len(nodes))
    assert_sampled(before.count(gone), share)


@settings(deadline=None)
@given(st.lists(ADDRESSES, min_size=3, max_size=3, unique=True))
def test_three_nodes_of_160_points_share_the_ring_fairly(nodes: list[str]) -> None:
    for share in shares(nodes).values():
        assert_fair(share, 3)


@settings(deadline=None)
@given(
    st.lists(ADDRESSES, min_size=1, max_size=6, unique=True).flatmap(
        lambda nodes: st.tuples(st.just(nodes), st.permutations(nodes))
    ),
    ADDRESSES,
)
def test_the_owner_does_not_depend_on_the_order_of_changes(orders: tuple[list[str], list[str]], extra: str) -> None:
    nodes, shuffled = orders
    ring = HashRing(nodes)
    other = HashRing()
    for node in shuffled:
        other.add(node)
        other.add(node)  # a second add changes nothing
    other.add(extra)
    if extra not in nodes:
        other.remove(extra)
    assert other.nodes == ring.nodes == frozenset(nodes)
    assert [other.owner(k) for k in keys("k")[:300]] == [ring.owner(k) for k in keys("k")[:300]]


def test_the_owner_is_the_same_in_another_process() -> None:
    # Another process with another string-hash seed: nothing depends on Python's hash().
    script = (
        "from fluxkv.cluster.hash_ring import HashRing\n"
        f"ring = HashRing({EXAMPLE_NODES!r})\n"
        "print(' '.join(ring.owner(f'key-{i}') for i in range(500)))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
    ring = HashRing(reversed(EXAMPLE_NODES))
    assert out.split() == [ring.owner(f"key-{i}") for i in range(500)]


def test_bad_use_is_refused() -> None:
    with pytest.raises(LookupError, match="no nodes"):
        HashRing().owner("k")
    with pytest.raises(ValueError, match="vnodes"):
        HashRing(vnodes=0)
    with pytest.raises(ValueError, match="non-empty"):
        HashRing([""])
    ring = HashRing(["a:1"])
    with pytest.raises(KeyError):
        ring.remove("b:1")
    ring.remove("a:1")
    with pytest.raises(LookupError):
        ring.owner("k")
