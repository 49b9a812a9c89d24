"""A per-key linearizability checker for recorded histories (Wing and Gong's
search, with Lowe's memoization of the configurations already tried).

Concurrent clients record each call: when it was invoked, when it completed,
and what it answered. The history of a key is linearizable when its calls can
be put in one order that respects real time (a call that completed before
another was invoked comes first) and in which every answer is the one a single
copy of the key gives. FluxKV applies each key's writes atomically on their
own, so a history is checked key by key, which keeps each search small.

The model is one key: absent (None), or (value, mod_revision). Calls and the
answers they record:
- ("set", value): the write's revision;
- ("cas", (expected_revision, value)): ("applied", revision), or ("failed",
  current_revision) with 0 for an absent key, as FluxKV's compare-and-set;
- ("delete", None): True if a key was deleted, else False;
- ("get", None): None, or (value, mod_revision).
A call whose outcome is unknown (it failed, or timed out) may have taken effect
at any moment after it was invoked, or never: record `completed=math.inf` and
the answer UNKNOWN. A write of unknown outcome leaves the key's revision
unknown until a read names it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

UNKNOWN = "unknown"  # the answer of a call whose outcome is unknown
State = tuple[Hashable, int | None] | None  # None: absent; a revision of None: not known


@dataclass(frozen=True)
class Call:
    key: str
    op: str  # set, cas, delete, get
    argument: Hashable
    answer: Hashable
    invoked: float
    completed: float  # math.inf: the outcome is unknown


def _revision(state: State) -> int | None:
    return 0 if state is None else state[1]


def _apply(state: State, call: Call) -> list[State]:
    """The states `call` may leave `state` in, given its answer; [] if the answer does not fit."""
    known = call.answer != UNKNOWN
    if call.op == "get":
        if not known:
            return [state]
        answer = call.answer
        if state is None or answer is None:
            return [state] if state == answer else []
        value, revision = answer  # type: ignore[misc]
        fits = state[0] == value and state[1] in (None, revision)
        return [(value, revision)] if fits else []
    if call.op == "set":
        if not known:
            return [(call.argument, None)]
        revision = call.answer
        assert isinstance(revision, int)
        current = _revision(state)
        return [(call.argument, revision)] if current is None or revision > current else []
    if call.op == "delete":
        if not known:
            return [None]
        return [None] if call.answer == (state is not None) else []
    if call.op == "cas":
        expected, value = call.argument  # type: ignore[misc]
        current = _revision(state)
        if not known:
            return [(value, None)] if current in (None, expected) else []
        outcome, revision = call.answer  # type: ignore[misc]
        if outcome == "applied":
            return [(value, revision)] if current in (None, expected) else []
        return [state] if current in (None, revision) and revision != expected else []
    raise ValueError(f"unknown op {call.op!r}")


def check_key(calls: list[Call], initial: State = None) -> bool:
    """Is the history of one key linearizable from `initial`?"""
    calls = sorted(calls, key=lambda c: c.invoked)
    seen: set[tuple[frozenset[int], State]] = set()
    # Depth first over (calls not yet placed, the key's state), on a stack: histories can be long.
    stack: list[tuple[frozenset[int], State]] = [(frozenset(range(len(calls))), initial)]
    while stack:
        left, state = stack.pop()
        if all(calls[i].completed == math.inf for i in left):
            return True  # what is left may never have taken effect
        if (left, state) in seen:
            continue
        seen.add((left, state))
        # A call may be placed next only if no call left completed before it was invoked.
        first_completion = min(calls[i].completed for i in left)
        for i in left:
            call = calls[i]
            if call.invoked > first_completion:
                continue
            stack.extend((left - {i}, after) for after in _apply(state, call))
            if call.completed == math.inf:
                stack.append((left - {i}, state))  # it never took effect
    return False


def check(calls: Iterable[Call]) -> list[str]:
    """The keys whose histories are not linearizable; empty when the whole history is."""
    by_key: dict[str, list[Call]] = {}
    for call in calls:
        by_key.setdefault(call.key, []).append(call)
    return sorted(key for key, history in by_key.items() if not check_key(history))
