"""Consistent hashing: which node owns a key.

Each node stands on a ring of 64-bit positions at `vnodes` points; a key belongs
to the node of the first point at or after the key's own position, wrapping past
the largest point to the smallest. Positions are the first 8 bytes of SHA-256,
big-endian, of UTF-8 text ("<address>#<i>" for a node's i-th point, the key
itself for a key), so a client in any language routes the same way:
docs/routing.md states the rules exactly, with a worked example.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable

DEFAULT_VNODES = 160


def position(text: str) -> int:
    """Where `text` stands on the ring: SHA-256 of its UTF-8 bytes, first 8 bytes as a big-endian unsigned int."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


class HashRing:
    """Nodes (addresses) on a consistent-hash ring. A lookup is one hash and a
    binary search; adding or removing a node merges or filters the sorted points.
    Change it from one thread at a time; lookups from any thread see the ring
    before or after a change, never in between."""

    def __init__(self, nodes: Iterable[str] = (), vnodes: int = DEFAULT_VNODES) -> None:
        if vnodes < 1:
            raise ValueError(f"vnodes must be at least 1, got {vnodes}")
        self._vnodes = vnodes
        self._nodes: set[str] = set()
        # (position, address), sorted: equal positions are ordered by address, and
        # bisect_left finds the first of them, so the smallest address wins a tie.
        self._points: list[tuple[int, str]] = []
        # What owner() reads, swapped in one assignment: (positions, their nodes).
        self._lookup: tuple[list[int], list[str]] = ([], [])
        for node in nodes:
            self.add(node)

    @property
    def nodes(self) -> frozenset[str]:
        return frozenset(self._nodes)

    def add(self, node: str) -> None:
        """Place `node` on the ring; adding a node that is there already changes nothing."""
        if not node:
            raise ValueError("a node address must be a non-empty string")
        if node in self._nodes:
            return
        self._nodes.add(node)
        self._rebuild(self._points + [(position(f"{node}#{i}"), node) for i in range(self._vnodes)])

    def remove(self, node: str) -> None:
        """Take `node` off the ring; KeyError if it is not on it."""
        self._nodes.remove(node)
        self._rebuild([point for point in self._points if point[1] != node])

    def owner(self, key: str) -> str:
        """The node that owns `key`; LookupError when the ring has no nodes."""
        positions, owners = self._lookup
        if not owners:
            raise LookupError("the hash ring has no nodes")
        i = bisect.bisect_left(positions, position(key))
        return owners[i if i < len(owners) else 0]

    def _rebuild(self, points: list[tuple[int, str]]) -> None:
        points.sort()
        self._points = points
        self._lookup = ([p for p, _ in points], [node for _, node in points])
